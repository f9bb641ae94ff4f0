//! What a forward or backward takes beyond its buffers: the adapter's
//! dropout and which kernel to run ([`ForwardOptions`](crate::ForwardOptions),
//! [`BackwardOptions`](crate::BackwardOptions)). A bare [`Dropout`] or a bare
//! kernel converts into them, the other field taking its default.

use crate::dropout::Dropout;

/// A launch's dropout (of the forward, and passed again to its backward)
/// and kernel choice `K`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchOptions<K> {
    pub dropout: Dropout,
    pub kernel: K,
}

impl<K: Default> Default for LaunchOptions<K> {
    fn default() -> Self {
        Self {
            dropout: Dropout::NONE,
            kernel: K::default(),
        }
    }
}

impl<K: Default> From<Dropout> for LaunchOptions<K> {
    fn from(dropout: Dropout) -> Self {
        Self {
            dropout,
            kernel: K::default(),
        }
    }
}

/// `From<kernel>` for the options of that kernel type (a generic impl would
/// overlap `From<Dropout>`).
macro_rules! from_kernel {
    ($k:ty) => {
        impl From<$k> for LaunchOptions<$k> {
            fn from(kernel: $k) -> Self {
                Self {
                    dropout: Dropout::NONE,
                    kernel,
                }
            }
        }
    };
}
from_kernel!(crate::ops::forward::ForwardKernel);
from_kernel!(crate::ops::backward::BackwardKernel);
