//! Hafen: a Matrix homeserver for organizations that keep their chat under their own control.
//! See docs/architecture.md for the map of this crate.

pub mod api;
pub mod config;
pub mod error;
pub mod policy;
pub mod server;
pub mod service;
pub mod storage;
pub mod utils;

#[cfg(test)]
mod fuzz;

/// The version `hafen --version` and the version endpoints report: the crate version, and the
/// commit when the build set `HAFEN_GIT_COMMIT` (see build.rs; git is not needed to build).
pub const VERSION: &str = env!("HAFEN_VERSION");
