//! The FUSE daemon: kernel requests in, [`FsClient`](crate::FsClient) calls out.
