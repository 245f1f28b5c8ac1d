//! Test helpers shared by bypass's integration tests.

pub mod contract;
