/* RDMA verbs (rdma-core's libibverbs): the types and exported functions flyfs
 * binds. The functions are loaded at run time (sys/build.rs asks bindgen for a
 * dynamically loaded library), so a flyfs binary starts on machines without
 * rdma-core; only the RDMA transport needs the library. */
#include <infiniband/verbs.h>
