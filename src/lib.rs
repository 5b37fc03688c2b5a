//! ferryfs: live migration of a dataset from an OLD store to a NEW store through a FUSE view.
//!
//! `fs` decides (the view's rules), `fuse` adapts it to the kernel, `journal` records what
//! neither store can show, `store` owns every path resolution inside a store.

pub mod control;
pub mod copier;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod handover;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod observe;
pub mod publish;
pub mod sdnotify;
pub mod state;
pub mod store;
