/* A saturating HTTP/1.1 load generator for `irmiddleware bench-proxy --peers`, and the canned
 * backend it loads routers in front of.
 *
 *   loadgen HOST PORT REQUEST_FILE CONNECTIONS SECONDS MAX_REQUESTS [RATE]
 *   loadgen serve PORT
 *
 * One thread per keep-alive connection, blocking sockets, the same request bytes sent again and
 * again (REQUEST_FILE holds them whole). Each response is read to its end by its framing only
 * (Content-Length, or chunked transfer coding, as SSE streams come): nothing else is parsed, so
 * the generator costs little beside the router it drives. It stops at SECONDS or once
 * MAX_REQUESTS were sent, whichever first (with RATE, requests/s in all, each connection sends at
 * its share of that rate instead of as fast as it can), and prints one JSON line: responses read whole,
 * how many were not 2xx, connection errors, seconds elapsed and the median latency.
 *
 * `serve` is a vLLM-shaped backend with fixed answers, one thread per connection: a chat or text
 * completion (or, when the body asks for a stream, 16 SSE events of one token, each sent on its
 * own as a server flushing tokens would, then `[DONE]`), `GET /v1/models` with model "m",
 * `GET /metrics` with vLLM's load gauges at 0, `{}` for any other GET. Python backends cost a few
 * hundred microseconds a request and would saturate long before the router under test.
 * Compiled with `zig cc` (the project's Zig toolchain) on first use; C keeps it independent of
 * the Zig standard library's changing API. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define MAX_SAMPLES 200000

static struct sockaddr_in target;
static char *request;
static size_t request_len;
static double deadline;
static long max_requests;
static double interval; /* seconds between one connection's requests when paced; 0: as fast as it can */
static atomic_long claimed, done, non2xx, errors;
static atomic_long samples_n;
static float samples[MAX_SAMPLES];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    int fd;
    char buf[BUF];
    size_t start, end; /* unread bytes are buf[start:end] */
} conn_t;

static int fill(conn_t *c) {
    if (c->start == c->end) c->start = c->end = 0;
    if (c->end == BUF) {
        memmove(c->buf, c->buf + c->start, c->end - c->start);
        c->end -= c->start;
        c->start = 0;
        if (c->end == BUF) return -1; /* a line longer than the buffer */
    }
    ssize_t n = recv(c->fd, c->buf + c->end, BUF - c->end, 0);
    if (n <= 0) return -1;
    c->end += (size_t)n;
    return 0;
}

/* The next line (without CRLF) as [*line, *line + *len), read into the buffer if needed. */
static int read_line(conn_t *c, char **line, size_t *len) {
    for (;;) {
        char *p = memchr(c->buf + c->start, '\n', c->end - c->start);
        if (p) {
            *line = c->buf + c->start;
            *len = (size_t)(p - *line);
            if (*len && (*line)[*len - 1] == '\r') (*len)--;
            c->start = (size_t)(p - c->buf) + 1;
            return 0;
        }
        if (fill(c)) return -1;
    }
}

static int skip(conn_t *c, long n) {
    while (n > 0) {
        if (c->start == c->end && fill(c)) return -1;
        long have = (long)(c->end - c->start);
        long take = have < n ? have : n;
        c->start += (size_t)take;
        n -= take;
    }
    return 0;
}

/* Reads one response whole; returns its status, or -1. */
static int read_response(conn_t *c) {
    char *line;
    size_t len;
    if (read_line(c, &line, &len) || len < 12) return -1;
    int status = atoi(line + 9);
    long length = -1;
    int chunked = 0;
    for (;;) {
        if (read_line(c, &line, &len)) return -1;
        if (len == 0) break;
        if (len > 15 && strncasecmp(line, "content-length:", 15) == 0) length = atol(line + 15);
        if (len > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
            line[len] = 0;
            chunked = strcasestr(line + 18, "chunked") != NULL;
        }
    }
    if (chunked) {
        for (;;) {
            if (read_line(c, &line, &len)) return -1;
            long size = strtol(line, NULL, 16);
            if (size == 0) { /* trailers, then the empty line */
                do {
                    if (read_line(c, &line, &len)) return -1;
                } while (len);
                return status;
            }
            if (skip(c, size + 2)) return -1;
        }
    }
    if (length < 0) return -1; /* a body to the close is not what a keep-alive router sends */
    return skip(c, length) ? -1 : status;
}

static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target)) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *worker(void *arg) {
    conn_t *c = calloc(1, sizeof *c);
    c->fd = -1;
    double next = now() + interval * (double)((long)arg) / 64.0; /* connections start staggered */
    while (now() < deadline && atomic_fetch_add(&claimed, 1) < max_requests) {
        if (interval > 0) {
            double wait = next - now();
            if (wait > 0) usleep((useconds_t)(wait * 1e6));
            next += interval;
        }
        if (c->fd < 0) {
            c->start = c->end = 0;
            if ((c->fd = open_conn()) < 0) {
                atomic_fetch_add(&errors, 1);
                usleep(10000);
                continue;
            }
        }
        double started = now();
        size_t sent = 0;
        while (sent < request_len) {
            ssize_t n = send(c->fd, request + sent, request_len - sent, MSG_NOSIGNAL);
            if (n <= 0) break;
            sent += (size_t)n;
        }
        int status = sent == request_len ? read_response(c) : -1;
        if (status < 0) {
            atomic_fetch_add(&errors, 1);
            close(c->fd);
            c->fd = -1;
            continue;
        }
        atomic_fetch_add(&done, 1);
        if (status < 200 || status > 299) atomic_fetch_add(&non2xx, 1);
        long i = atomic_fetch_add(&samples_n, 1);
        if (i < MAX_SAMPLES) samples[i] = (float)(now() - started);
    }
    if (c->fd >= 0) close(c->fd);
    free(c);
    return NULL;
}

static int by_value(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int client_main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: loadgen HOST PORT REQUEST_FILE CONNECTIONS SECONDS MAX_REQUESTS [RATE]\n");
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) return 2;
    FILE *file = fopen(argv[3], "rb");
    if (!file) return 2;
    request = malloc(BUF);
    request_len = fread(request, 1, BUF, file);
    fclose(file);
    int connections = atoi(argv[4]);
    double seconds = atof(argv[5]);
    max_requests = atol(argv[6]);
    double rate = argc == 8 ? atof(argv[7]) : 0;
    if (connections < 1 || connections > 4096 || seconds <= 0 || max_requests < 1 || rate < 0) return 2;
    interval = rate > 0 ? connections / rate : 0;
    pthread_t *threads = calloc((size_t)connections, sizeof *threads);
    double started = now();
    deadline = started + seconds;
    for (int i = 0; i < connections; i++) pthread_create(&threads[i], NULL, worker, (void *)(long)(i % 64));
    for (int i = 0; i < connections; i++) pthread_join(threads[i], NULL);
    double elapsed = now() - started;
    long n = atomic_load(&samples_n);
    if (n > MAX_SAMPLES) n = MAX_SAMPLES;
    qsort(samples, (size_t)n, sizeof *samples, by_value);
    printf("{\"responses\": %ld, \"non_2xx\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"p50_s\": %.6f}\n",
           atomic_load(&done), atomic_load(&non2xx), atomic_load(&errors), elapsed,
           n ? samples[n / 2] : 0.0);
    return 0;
}

/* ---- `loadgen serve PORT`: a canned vLLM-shaped backend ------------------------------------ */

#define EVENT "data: {\"id\":\"chatcmpl-0\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\"," \
              "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"},\"finish_reason\":null}]}\n\n"
#define COMPLETION "{\"id\":\"chatcmpl-0\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"m\"," \
    "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"token token token token " \
    "token token token token token token token token token token token token \"},\"finish_reason\":\"length\"}]," \
    "\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":16,\"total_tokens\":24}}"
#define MODELS "{\"object\":\"list\",\"data\":[{\"id\":\"m\",\"object\":\"model\",\"owned_by\":\"vllm\",\"max_model_len\":4096}]}"
#define METRICS "vllm:num_requests_running{model_name=\"m\"} 0.0\nvllm:num_requests_waiting{model_name=\"m\"} 0.0\n" \
    "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.0\n"
#define STREAM_CHUNKS 16

static char answer[1024], models[512], metrics[512], empty[256], stream_head[256], event[512], stream_end[64];
static size_t answer_n, models_n, metrics_n, empty_n, stream_head_n, event_n, stream_end_n;

static size_t fixed(char *out, const char *type, const char *body) {
    return (size_t)sprintf(out, "HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %zu\r\n\r\n%s", type,
                           strlen(body), body);
}

static int send_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
        if (sent <= 0) return -1;
        data += sent;
        n -= (size_t)sent;
    }
    return 0;
}

/* One request read and answered; -1 when the connection ended. */
static int serve_one(conn_t *c) {
    char *line, target[256];
    size_t len;
    if (read_line(c, &line, &len) || len < 5) return -1;
    int post = strncmp(line, "POST ", 5) == 0;
    size_t tn = len < sizeof target - 1 ? len : sizeof target - 1;
    memcpy(target, line, tn);
    target[tn] = 0;
    long length = 0;
    for (;;) {
        if (read_line(c, &line, &len)) return -1;
        if (len == 0) break;
        if (len > 15 && strncasecmp(line, "content-length:", 15) == 0) length = atol(line + 15);
    }
    int stream = 0;
    if (length > 0) {
        if (length > BUF / 2) return -1;
        while ((long)(c->end - c->start) < length) {
            if (c->end == BUF) { /* room for the body: move what is unread to the front */
                memmove(c->buf, c->buf + c->start, c->end - c->start);
                c->end -= c->start;
                c->start = 0;
            }
            ssize_t n = recv(c->fd, c->buf + c->end, BUF - c->end, 0);
            if (n <= 0) return -1;
            c->end += (size_t)n;
        }
        char *body = c->buf + c->start;
        stream = memmem(body, (size_t)length, "\"stream\":true", 13) || memmem(body, (size_t)length, "\"stream\": true", 14);
        c->start += (size_t)length;
    }
    if (!post) {
        if (strstr(target, " /v1/models")) return send_all(c->fd, models, models_n);
        if (strstr(target, " /metrics")) return send_all(c->fd, metrics, metrics_n);
        return send_all(c->fd, empty, empty_n);
    }
    if (!stream) return send_all(c->fd, answer, answer_n);
    if (send_all(c->fd, stream_head, stream_head_n)) return -1;
    for (int i = 0; i < STREAM_CHUNKS; i++)  /* one write per token, as a server flushing tokens */
        if (send_all(c->fd, event, event_n)) return -1;
    return send_all(c->fd, stream_end, stream_end_n);
}

static void *serve_conn(void *arg) {
    conn_t *c = calloc(1, sizeof *c);
    c->fd = (int)(long)arg;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (serve_one(c) == 0) {
    }
    close(c->fd);
    free(c);
    return NULL;
}

static int server_main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: loadgen serve PORT\n");
        return 2;
    }
    answer_n = fixed(answer, "application/json", COMPLETION);
    models_n = fixed(models, "application/json", MODELS);
    metrics_n = fixed(metrics, "text/plain; version=0.0.4", METRICS);
    empty_n = fixed(empty, "application/json", "{}");
    stream_head_n = (size_t)sprintf(stream_head,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
    event_n = (size_t)sprintf(event, "%zx\r\n%s\r\n", strlen(EVENT), EVENT);
    stream_end_n = (size_t)sprintf(stream_end, "%zx\r\n%s\r\n0\r\n\r\n", strlen("data: [DONE]\n\n"), "data: [DONE]\n\n");
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 1024)) {
        perror("loadgen serve");
        return 1;
    }
    for (;;) {
        int client = accept(fd, NULL, NULL);
        if (client < 0) continue;
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&thread, &attr, serve_conn, (void *)(long)client)) close(client);
        pthread_attr_destroy(&attr);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "serve") == 0) return server_main(argc, argv);
    return client_main(argc, argv);
}
