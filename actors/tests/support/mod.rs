//! Shared test support.

pub mod receiver;
