//! ferryfs: live migration of a dataset from an OLD store to a NEW store through a FUSE view.
//!
//! One folder per part, from the face down to the stores (docs/ARCHITECTURE.md draws it, and
//! tests/architecture.rs holds the layering as rules): `cli` parses and dispatches, `daemon`
//! serves a view, `control` and `observe` answer the operator, `fuse` adapts the view to the
//! kernel, `lifecycle` ends a migration, `state` owns the state dir, `copier` drains OLD into
//! NEW, `view` decides (the view's rules), `journal` records what neither store can show,
//! `store` owns every path resolution inside a store, and `metrics` counts.

pub mod cli;
pub mod control;
pub mod copier;
pub mod daemon;
pub mod fuse;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod observe;
pub mod state;
pub mod store;
pub mod view;
pub mod workers;
