/* A UDP echo server for the user-mode networking test: udp_echo PORT sends every
 * datagram back to where it came from. Busybox has no UDP server applet. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: udp_echo PORT\n");
		return 2;
	}
	int sock = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in addr = {0};
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (sock < 0 || bind(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
		perror("udp_echo");
		return 1;
	}
	char buf[2048];
	for (;;) {
		struct sockaddr_in peer;
		socklen_t len = sizeof peer;
		ssize_t n = recvfrom(sock, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
		if (n >= 0)
			sendto(sock, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
	}
}
