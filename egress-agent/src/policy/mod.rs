//! The policy's way in: YAML documents (a file, the admin socket, or Kubernetes objects) are
//! parsed into the validated model ([`config`]), compiled into the kernel's map entries
//! ([`compile`]), kept as the live set of objects ([`store`]), and shared while in force
//! ([`live`]).

pub mod compile;
pub mod config;
pub mod live;
pub mod store;

pub use compile::*;
pub use config::*;
pub use live::Live;
pub use store::Store;
