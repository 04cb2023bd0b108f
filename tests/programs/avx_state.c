// Checks that a process's AVX registers survive task switches and signal handlers.
//
// Each of N processes keeps its own pattern in ymm7 (upper half included) across a busy
// loop, then checks it, while the others compete for the CPU and a timer signal every
// 20 ms runs a handler that clobbers ymm7 the way glibc's AVX functions do. A guest kernel
// that switches or saves less than the state user space can use (hearth's nested-PVM
// case) corrupts the patterns. Prints one line per process and a verdict; exits 1 on
// corruption, 2 when the check proved nothing (no signal arrived).
//
// Usage: avx_state [SECONDS] [PROCESSES]. Built static by tests/container.rs.
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t signals;

static void clobber(int sig) {
    (void)sig;
    signals++;
    asm volatile("vpcmpeqd %%ymm7, %%ymm7, %%ymm7\n\tvzeroupper" ::: "xmm7");
}

static int avx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_AVX))
        return 0;
    unsigned lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6) == 6;
}

// Loads `want` into ymm7, spins, and reports whether ymm7 still holds it.
static int check_once(const long *want, long iters) {
    int bad;
    asm volatile(
        "vmovdqu (%[w]), %%ymm7\n\t"
        "mov %[n], %%rcx\n"
        "1:\n\t"
        "dec %%rcx\n\t"
        "jnz 1b\n\t"
        "vpxor (%[w]), %%ymm7, %%ymm6\n\t"
        "xor %[bad], %[bad]\n\t"
        "vptest %%ymm6, %%ymm6\n\t"
        "setnz %b[bad]\n\t"
        "vzeroupper"
        : [bad] "=&r"(bad)
        : [w] "r"(want), [n] "r"(iters)
        : "rcx", "xmm6", "xmm7", "cc", "memory");
    return bad;
}

static double since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static int worker(int index, double secs) {
    struct sigaction sa = {.sa_handler = clobber, .sa_flags = SA_RESTART};
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every_20ms = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &every_20ms, NULL);
    long v = 0x1111111111111111L * (index + 1);
    long want[4] = {v, v + 1, v + 2, v + 3};
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long checks = 0, bad = 0;
    do {
        bad += check_once(want, 2000000);
        checks++;
    } while (since(&t0) < secs);
    printf("process %d: %ld checks, %ld signals, %ld corrupted\n", index, checks,
           (long)signals, bad);
    fflush(stdout);
    return bad ? 1 : signals ? 0 : 2;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 3;
    int n = argc > 2 ? atoi(argv[2]) : 3;
    if (!avx_usable()) {
        printf("no AVX here: nothing to check\n");
        return 0;
    }
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 2;
        }
        if (pid == 0)
            _exit(worker(i, secs));
    }
    int status, worst = 0;
    while (wait(&status) > 0) {
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
        if (code == 1 || (code == 2 && worst == 0))
            worst = code;
    }
    puts(worst == 1 ? "AVX STATE CORRUPTED" : worst == 2 ? "no signal arrived" : "avx state intact");
    return worst;
}
