/*
 * flyfs native I/O for C: zero-copy reads and writes through the flyfs mount
 * daemon's shared memory (the USRBIO shape; the protocol is docs/native-io.md).
 *
 * Link with -lflyfs_usrbio_c (libflyfs_usrbio_c.a or .so, built by
 * `cargo build -p flyfs-usrbio-c`); the static library also needs
 * -lpthread -ldl -lm.
 *
 *   flyfs_client *client;   flyfs_connect("/path/native.sock", &client);
 *   flyfs_iov *iov;         flyfs_iov_create(client, 64 << 20, &iov);
 *   flyfs_ior *ior;         flyfs_ior_create(client, 64, &ior);     (one per thread)
 *   int fd = open("/mnt/flyfs/data", O_RDONLY);
 *   flyfs_file *file;       flyfs_file_register(client, fd, &file); close(fd);
 *   flyfs_prep_read(ior, file, iov, 0, 1 << 20, 0, 42);
 *   flyfs_submit(ior);
 *   struct flyfs_completion done[64];
 *   int n = flyfs_wait(ior, done, 64, 1, -1);        (bytes at flyfs_iov_base(iov))
 *   flyfs_file_close(file); flyfs_ior_free(ior); flyfs_iov_free(iov);
 *   flyfs_client_free(client);
 *
 * Every function returning int returns 0 (or a count) on success and -errno on
 * failure; flyfs_last_error() then has the message of this thread's last
 * failure. A failed request is a completion with result -errno (the ring's
 * reason: flyfs_ior_last_error). Objects made from a client must be freed
 * before it. An ior is used by one thread at a time.
 */
#ifndef FLYFS_USRBIO_H
#define FLYFS_USRBIO_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flyfs_client flyfs_client;
typedef struct flyfs_iov flyfs_iov;
typedef struct flyfs_ior flyfs_ior;
typedef struct flyfs_file flyfs_file;

/* One finished request: bytes moved (short only at the end of the file), or -errno. */
struct flyfs_completion {
    uint64_t user_data;
    int64_t result;
};

/* The message of this thread's last failed call ("" if none); valid until the next call. */
const char *flyfs_last_error(void);

int flyfs_connect(const char *socket_path, flyfs_client **out);
void flyfs_client_free(flyfs_client *client);

/* A shared buffer of `size` bytes (a sealed memfd) registered with the daemon. */
int flyfs_iov_create(flyfs_client *client, uint64_t size, flyfs_iov **out);
uint8_t *flyfs_iov_base(const flyfs_iov *iov);
uint64_t flyfs_iov_size(const flyfs_iov *iov);
void flyfs_iov_free(flyfs_iov *iov);

/* A ring of `entries` entries: a power of two, at most 4096. */
int flyfs_ior_create(flyfs_client *client, uint32_t entries, flyfs_ior **out);
void flyfs_ior_free(flyfs_ior *ior);
/* Why the daemon failed this ring's last failed request; valid until the next call. */
const char *flyfs_ior_last_error(flyfs_ior *ior);

/* A file opened through the mount; `fd` may be closed afterwards. */
int flyfs_file_register(flyfs_client *client, int fd, flyfs_file **out);
uint64_t flyfs_file_length(const flyfs_file *file);
/* Deregisters and frees: flushed to every replica, length fixed, session ended. */
int flyfs_file_close(flyfs_file *file);

int flyfs_prep_read(flyfs_ior *ior, const flyfs_file *file, const flyfs_iov *iov,
                    uint64_t iov_offset, uint32_t len, uint64_t file_offset, uint64_t user_data);
int flyfs_prep_write(flyfs_ior *ior, const flyfs_file *file, const flyfs_iov *iov,
                     uint64_t iov_offset, uint32_t len, uint64_t file_offset, uint64_t user_data);
/* What close(2) through the mount does, without closing. */
int flyfs_prep_flush(flyfs_ior *ior, const flyfs_file *file, uint64_t user_data);

/* Hands the prepared entries to the daemon: how many, or -errno. */
int flyfs_submit(flyfs_ior *ior);
/* Waits for at least `min` and returns at most `max` completions into `out`;
 * timeout_ms < 0 waits without a limit. -EINVAL if `min` exceeds what is
 * outstanding (never a hang), -ETIMEDOUT, -EIO if the daemon failed the ring. */
int flyfs_wait(flyfs_ior *ior, struct flyfs_completion *out, int max, int min, int timeout_ms);

#ifdef __cplusplus
}
#endif

#endif /* FLYFS_USRBIO_H */
