//! The storage service (CRAQ chain replication over chunk engines), the cluster
//! manager and the storage client. Arrives with the replication issue.
#![deny(unsafe_code)]
