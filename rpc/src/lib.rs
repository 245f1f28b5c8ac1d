//! Wire types of every flyfs service, their codec and framing, and the
//! transports (TCP now, RDMA later). Arrives with the replication issue.
#![deny(unsafe_code)]
