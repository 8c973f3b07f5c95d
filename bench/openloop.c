/* An open-loop HTTP/1.1 sender for the openloop bench section (#19 item 2).

   openloop PORT RATE SECONDS CONNECTIONS BODY_BYTES [LATENCIES_FILE]

   Request i (a POST of BODY_BYTES to 127.0.0.1:PORT/post) is due at i/RATE seconds after
   the start, whether or not earlier ones were answered: a timerfd wakes the sender at each
   due time, the request goes out on an idle kept-alive connection, or, when all
   CONNECTIONS are busy, waits for the first one to come free. Its latency counts from the
   time it was due, so that wait, like a slow answer, shows in it (no coordinated
   omission). An answer's end is its head plus Content-Length.

   It exists because the senders the issue names do not reach half of this machine's
   saturation: `gproxyctl replay` (gevent, one core) tops out at ~10-13k req/s against
   nginx directly, 25 ms behind its schedule at 15k; httperf reports reply times as
   averages and connection times in 1 ms bins, too coarse for a sub-millisecond p99.

   Prints one JSON object: requests due, answered, errors, unanswered at the end, latency
   percentiles (ms), and the sender's own lateness (how long after its due time the
   scheduler handed each request on, p50/p99/max in ms): when that is large the machine,
   not the target, made the latency. With LATENCIES_FILE, every answered request's latency
   is written there too, in microseconds, as native uint32s in ascending order, so that
   the rounds of a run can be pooled: the p99 of all their requests, not a median of
   each round's p99. Standard C and Linux (epoll, timerfd) only. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#define BUFFER 65536
#define DRAIN_SECONDS 3.0

struct conn {
    int fd;
    int busy;
    double due;        /* due time of the request in flight */
    size_t got;        /* bytes of the answer so far */
    size_t need;       /* head + body, once the head is complete; 0 before */
    char head[4096];
    size_t head_len;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double percentile(double *sorted, size_t n, double share) {
    if (!n) return -1;
    size_t rank = (size_t)(share * n + 0.999999999);
    if (rank < 1) rank = 1;
    return sorted[rank - 1];
}

static char *request;
static size_t request_len;
static double *latencies, *lags, *backlog;
static size_t n_latencies, n_lags, backlog_head, backlog_tail, capacity;
static long errors;
/* Idle connections in the order they came free: the next request takes the one idle
   longest, so load spreads over all of them as wrk's connections share it. */
static int *idle_ring;
static size_t idle_head, idle_count, idle_size;

static void push_idle(int i) {
    idle_ring[(idle_head + idle_count++) % idle_size] = i;
}

static int pop_idle(void) {
    int i = idle_ring[idle_head];
    idle_head = (idle_head + 1) % idle_size;
    idle_count--;
    return i;
}

static int send_request(struct conn *c, double due) {
    size_t sent = 0;
    while (sent < request_len) {
        ssize_t n = send(c->fd, request + sent, request_len - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) continue;  /* 1 KiB into an idle kept-alive socket */
            return -1;
        }
        sent += (size_t)n;
    }
    c->busy = 1;
    c->due = due;
    c->got = c->need = c->head_len = 0;
    return 0;
}

/* Reads what C has; 1 when its answer is complete, 0 when not yet, -1 on an error. */
static int read_answer(struct conn *c) {
    static char buffer[BUFFER];
    for (;;) {
        ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (!c->need) {
            size_t take = (size_t)n;
            if (c->head_len + take > sizeof c->head - 1) take = sizeof c->head - 1 - c->head_len;
            memcpy(c->head + c->head_len, buffer, take);
            c->head_len += take;
            c->head[c->head_len] = 0;
            char *end = strstr(c->head, "\r\n\r\n");
            if (end) {
                char *field = strcasestr(c->head, "\r\ncontent-length:");
                if (!field || field > end) return -1;
                c->need = (size_t)(end + 4 - c->head) + strtoul(field + 17, NULL, 10);
            } else if (c->head_len >= sizeof c->head - 1) {
                return -1;
            }
        }
        c->got += (size_t)n;
        if (c->need && c->got >= c->need) return 1;
    }
}

static void arm(int timer, double at) {
    struct itimerspec spec = {0};
    spec.it_value.tv_sec = (time_t)at;
    spec.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    if (!spec.it_value.tv_sec && !spec.it_value.tv_nsec) spec.it_value.tv_nsec = 1;
    timerfd_settime(timer, TFD_TIMER_ABSTIME, &spec, NULL);
}

static int write_latencies(const char *path) {
    FILE *file = fopen(path, "wb");
    if (!file) return -1;
    for (size_t i = 0; i < n_latencies; i++) {
        double us = latencies[i] * 1e6 + 0.5;
        uint32_t value = us >= 4294967295.0 ? UINT32_MAX : (uint32_t)us;
        if (fwrite(&value, sizeof value, 1, file) != 1) {
            fclose(file);
            return -1;
        }
    }
    return fclose(file);
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: openloop PORT RATE SECONDS CONNECTIONS BODY_BYTES "
                        "[LATENCIES_FILE]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    int connections = atoi(argv[4]);
    size_t body = (size_t)atol(argv[5]);
    if (port <= 0 || rate <= 0 || seconds <= 0 || connections <= 0) {
        fprintf(stderr, "openloop: bad arguments\n");
        return 2;
    }
    char head[256];
    int head_len = snprintf(head, sizeof head,
                            "POST /post HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                            "Content-Type: application/octet-stream\r\n"
                            "Content-Length: %zu\r\n\r\n", port, body);
    request_len = (size_t)head_len + body;
    request = malloc(request_len);
    memcpy(request, head, (size_t)head_len);
    memset(request + head_len, 'x', body);

    capacity = (size_t)(rate * seconds) + 2;
    latencies = malloc(capacity * sizeof *latencies);
    lags = malloc(capacity * sizeof *lags);
    backlog = malloc(capacity * sizeof *backlog);

    int epoll = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)connections, sizeof *conns);
    idle_size = (size_t)connections;
    idle_ring = malloc(idle_size * sizeof *idle_ring);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    for (int i = 0; i < connections; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&address, sizeof address) < 0) {
            fprintf(stderr, "openloop: connect to 127.0.0.1:%d: %s\n", port, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* Blocking connect, then non-blocking: every connection is open before t=0. */
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        conns[i].fd = fd;
        struct epoll_event event = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
        push_idle(i);
    }
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event timer_event = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epoll, EPOLL_CTL_ADD, timer, &timer_event);

    size_t total = (size_t)(rate * seconds);
    size_t next = 0;      /* index of the next request to fall due */
    double start = now() + 0.01;
    arm(timer, start);
    double deadline = start + seconds + DRAIN_SECONDS;
    struct epoll_event events[256];
    for (;;) {
        size_t outstanding = next - n_latencies - (size_t)errors;
        if (next >= total && outstanding == 0) break;
        if (now() > deadline) break;
        int ready = epoll_wait(epoll, events, 256, 100);
        for (int e = 0; e < ready; e++) {
            uint32_t which = events[e].data.u32;
            if (which == UINT32_MAX) {
                uint64_t expirations;
                (void)!read(timer, &expirations, sizeof expirations);
                double t = now();
                while (next < total && start + next / rate <= t) {
                    double due = start + next / rate;
                    next++;
                    lags[n_lags++] = t - due;
                    if (idle_count) {
                        if (send_request(&conns[pop_idle()], due) < 0) errors++;
                    } else {
                        backlog[backlog_tail++] = due;
                    }
                }
                if (next < total) arm(timer, start + next / rate);
                continue;
            }
            struct conn *c = &conns[which];
            if (!c->busy) continue;
            int done = read_answer(c);
            if (done == 0) continue;
            double t = now();
            if (done < 0) {
                errors++;
                fprintf(stderr, "openloop: connection %u failed\n", which);
                epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->busy = 1;  /* never used again */
                continue;
            }
            latencies[n_latencies++] = t - c->due;
            c->busy = 0;
            if (backlog_head < backlog_tail) {
                if (send_request(c, backlog[backlog_head++]) < 0) errors++;
            } else {
                push_idle((int)which);
            }
        }
    }
    double elapsed = now() - start;
    qsort(latencies, n_latencies, sizeof *latencies, compare);
    qsort(lags, n_lags, sizeof *lags, compare);
    if (argc == 7 && write_latencies(argv[6]) < 0) {
        fprintf(stderr, "openloop: cannot write %s: %s\n", argv[6], strerror(errno));
        return 1;
    }
    printf("{\"due\": %zu, \"answered\": %zu, \"errors\": %ld, \"unanswered\": %zu, "
           "\"seconds\": %.3f, \"rate\": %.1f, "
           "\"p50_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, \"p999_ms\": %.4f, "
           "\"max_ms\": %.4f, \"lag_p50_ms\": %.4f, \"lag_p99_ms\": %.4f, "
           "\"lag_max_ms\": %.4f, \"waited_for_connection\": %zu}\n",
           next, n_latencies, errors, next - n_latencies - (size_t)errors, elapsed,
           n_latencies / seconds,
           percentile(latencies, n_latencies, 0.50) * 1e3,
           percentile(latencies, n_latencies, 0.90) * 1e3,
           percentile(latencies, n_latencies, 0.99) * 1e3,
           percentile(latencies, n_latencies, 0.999) * 1e3,
           n_latencies ? latencies[n_latencies - 1] * 1e3 : -1.0,
           percentile(lags, n_lags, 0.50) * 1e3, percentile(lags, n_lags, 0.99) * 1e3,
           n_lags ? lags[n_lags - 1] * 1e3 : -1.0, backlog_tail);
    return 0;
}
