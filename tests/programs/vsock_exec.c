/*
 * vsock_exec: a command server on AF_VSOCK for hearth's Linux tests. It listens on the
 * port given as argv[1] (any CID), says so on stdout, and for each connection reads one
 * line and runs it as `sh -c LINE` with the connection as stdin, stdout and stderr; the
 * connection closes when the command ends. A host program reaches it through hearth's
 * vsock socket with "CONNECT <port>\n".
 *
 * Built static by the test that uses it (cc -static), so it runs from any guest disk.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
    unsigned int port = argc > 1 ? (unsigned int)strtoul(argv[1], NULL, 10) : 5000;
    struct sockaddr_vm addr;
    int listener = socket(AF_VSOCK, SOCK_STREAM, 0);

    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_port = port;
    addr.svm_cid = VMADDR_CID_ANY;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(listener, 4) < 0) {
        perror("vsock_exec");
        return 1;
    }
    printf("vsock-exec listening on port %u\n", port);
    fflush(stdout);
    /* Children are never waited for. */
    signal(SIGCHLD, SIG_IGN);

    for (;;) {
        char line[4096];
        size_t len = 0;
        int conn = accept(listener, NULL, NULL);

        if (conn < 0) {
            if (errno != EINTR)
                perror("vsock_exec: accept");
            continue;
        }
        if (fork() != 0) {
            close(conn);
            continue;
        }
        while (len < sizeof(line) - 1 && read(conn, line + len, 1) == 1 && line[len] != '\n')
            len++;
        line[len] = '\0';
        dup2(conn, 0);
        dup2(conn, 1);
        dup2(conn, 2);
        close(conn);
        close(listener);
        execl("/bin/sh", "sh", "-c", line, (char *)NULL);
        _exit(127);
    }
}
