//! Message types of every service.

pub mod mgmt;
pub mod storage;
