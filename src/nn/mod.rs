//! The layer frameworks link ([`SingLoraLinear`]), its ramp and its
//! initialisation.

mod frozen;
pub mod init;
pub mod layer;
pub mod ramp;

pub use init::{kaiming_uniform, SplitMix64};
pub use layer::{ForwardCtx, SingLoraLinear};
pub use ramp::Ramp;
