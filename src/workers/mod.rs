//! The copier across many machines: the mount daemon coordinates (`mount --workers-listen`),
//! remote workers copy (`ferryfs worker`). See docs/ARCHITECTURE.md, "Remote workers".

pub mod coordinator;
pub mod http;
pub mod protocol;
pub mod tls;
pub mod worker;
