/* Compiled and run by tests/c_header.rs: the header compiles as C, the
 * static library links, and errors come back as -errno with a message.
 * With a socket and a file on the mount as arguments, it also reads the
 * file's first bytes through a ring and prints them. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "flyfs_usrbio.h"

#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            fprintf(stderr, "smoke.c:%d: ", __LINE__);    \
            fprintf(stderr, __VA_ARGS__);                 \
            fprintf(stderr, " (%s)\n", flyfs_last_error()); \
            return 1;                                     \
        }                                                 \
    } while (0)

int main(int argc, char **argv) {
    flyfs_client *client = NULL;
    int rc = flyfs_connect("/nonexistent/flyfs-native.sock", &client);
    CHECK(rc == -ENOENT, "connect to a missing socket: %d", rc);
    CHECK(strstr(flyfs_last_error(), "/nonexistent/flyfs-native.sock") != NULL, "message names the path");
    rc = flyfs_connect(NULL, &client);
    CHECK(rc == -EINVAL, "NULL path: %d", rc);
    CHECK(strstr(flyfs_last_error(), "NULL") != NULL, "message says NULL");
    CHECK(flyfs_submit(NULL) == -EINVAL, "NULL ior");
    if (argc < 3) {
        printf("ok\n");
        return 0;
    }
    rc = flyfs_connect(argv[1], &client);
    CHECK(rc == 0, "connect: %d", rc);
    flyfs_iov *iov;
    CHECK(flyfs_iov_create(client, 1 << 20, &iov) == 0, "iov");
    flyfs_ior *ior;
    CHECK(flyfs_ior_create(client, 8, &ior) == 0, "ior");
    int fd = open(argv[2], O_RDONLY);
    CHECK(fd >= 0, "open %s", argv[2]);
    flyfs_file *file;
    CHECK(flyfs_file_register(client, fd, &file) == 0, "register");
    close(fd);
    CHECK(flyfs_prep_read(ior, file, iov, 0, 16, 0, 7) == 0, "prep");
    CHECK(flyfs_submit(ior) == 1, "submit");
    struct flyfs_completion done[8];
    int n = flyfs_wait(ior, done, 8, 1, 60000);
    CHECK(n == 1 && done[0].user_data == 7 && done[0].result > 0, "wait: %d", n);
    fwrite(flyfs_iov_base(iov), 1, (size_t)done[0].result, stdout);
    CHECK(flyfs_wait(ior, done, 8, 1, 0) == -EINVAL, "waiting for more than outstanding");
    CHECK(flyfs_file_close(file) == 0, "close");
    flyfs_ior_free(ior);
    flyfs_iov_free(iov);
    flyfs_client_free(client);
    return 0;
}
