//! The operations, one module each, every one with the same three faces:
//! `check_*` (every argument check, given buffer lengths; no GPU), `*_raw`
//! (raw device pointers and a checked shape, for frameworks that own their
//! memory) and the safe launcher over cudarc buffers.

pub mod adamw;
pub mod backward;
pub mod fill;
pub mod forward;
pub mod merge;
pub mod mse;
pub mod options;
pub(crate) mod regions;
pub mod scale;
