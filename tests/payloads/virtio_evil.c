/*
 * virtio_evil: a hostile virtio driver. It brings up the virtio-blk device at
 * VIRTIO_BLK_BASE and the virtio-net device at VIRTIO_NET_BASE (virtio-mmio version 2,
 * VIRTIO_F_VERSION_1 only), posts malformed descriptor chains to them, and checks that
 * hearth returns every chain it can return, with the status the virtio 1.x spec asks for,
 * and that valid requests still work afterwards.
 *
 * Run with --memory GUEST_MEMORY_MIB M, a writable --disk first (sector 0 all 'A', sector 1
 * and 2 anything) and a --net tap second, whose host side answers ARP for host_ip (169.254.77.1).
 * The payload writes 'X' to sector 1 and nothing else; a chain that would write 'Z' to
 * sector 2 is malformed and must not reach the disk.
 *
 * Prints one line per case ("blk case N (what): used len L status S") and exits with
 * status 0 after "virtio_evil done", or prints "FAIL: ..." and exits 1 on the first
 * expectation that does not hold, naming a case that never completed as hung. Interrupts
 * stay off: completions are found by polling the used rings, with TSC deadlines.
 *
 * Built by the test harness with gcc -ffreestanding at -O0; general registers only, since
 * the boot state leaves SSE disabled (CR4.OSFXSR clear) and there is no IDT.
 */
#pragma GCC target("general-regs-only")

#include "payload.h"

#ifndef GUEST_MEMORY_MIB
#define GUEST_MEMORY_MIB        64
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* lib64.S */
void serial_puts(const char *s);
void serial_putdec(u32 value);

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, u64 n)
{
        volatile u8 *d = dst;
        for (u64 i = 0; i < n; i++)
                d[i] = (u8)c;
        return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
        volatile u8 *d = dst;
        const u8 *s = src;
        for (u64 i = 0; i < n; i++)
                d[i] = s[i];
        return dst;
}

/* ---- guest layout ------------------------------------------------------------------ */

#define RAM_END                 ((u64)GUEST_MEMORY_MIB << 20)
/* Guest-physical addresses with no RAM behind them (RAM_END is far below 3 GiB). */
#define NO_RAM_ABOVE_4G         0x110000000UL
#define NO_RAM_HIGH             0x7f0000000000UL
#define VIRTIO_BLK_BASE         0xd0000000UL
#define VIRTIO_NET_BASE         0xd0001000UL

/* ---- virtio-mmio registers and constants -------------------------------------------- */

#define MMIO_MAGIC              0x000
#define MMIO_VERSION            0x004
#define MMIO_DEVICE_ID          0x008
#define MMIO_DEVICE_FEATURES    0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES    0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL          0x030
#define MMIO_QUEUE_NUM_MAX      0x034
#define MMIO_QUEUE_NUM          0x038
#define MMIO_QUEUE_READY        0x044
#define MMIO_QUEUE_NOTIFY       0x050
#define MMIO_STATUS             0x070
#define MMIO_QUEUE_DESC_LOW     0x080
#define MMIO_QUEUE_DESC_HIGH    0x084
#define MMIO_QUEUE_DRIVER_LOW   0x090
#define MMIO_QUEUE_DRIVER_HIGH  0x094
#define MMIO_QUEUE_DEVICE_LOW   0x0a0
#define MMIO_QUEUE_DEVICE_HIGH  0x0a4
#define MMIO_CONFIG             0x100

#define MAGIC_VIRT              0x74726976
#define DEVICE_ID_NET           1
#define DEVICE_ID_BLOCK         2

#define S_ACKNOWLEDGE           1
#define S_DRIVER                2
#define S_DRIVER_OK             4
#define S_FEATURES_OK           8
#define S_NEEDS_RESET           0x40
#define S_FAILED                0x80

#define F_VERSION_1_HIGH        1       /* feature bit 32: bit 0 of the high word */

#define DESC_F_NEXT             1
#define DESC_F_WRITE            2
#define DESC_F_INDIRECT         4
#define AVAIL_F_NO_INTERRUPT    1

#define BLK_T_IN                0
#define BLK_T_OUT               1
#define BLK_S_OK                0
#define BLK_S_IOERR             1
#define BLK_S_UNSUPP            2

#define QSIZE                   16
#define SECTOR                  512
/* The status byte before the device writes it, and the fill of untouched data buffers. */
#define POISON                  0xee

/* ---- small helpers ------------------------------------------------------------------ */

#define barrier()               __asm__ volatile("" ::: "memory")
#define mb()                    __asm__ volatile("mfence" ::: "memory")

static u64 rdtsc(void)
{
        u32 lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        return ((u64)hi << 32) | lo;
}

/*
 * Deadlines assume a TSC of at most 3 GHz; a slower TSC only makes them longer. HANG is
 * how long a request may take before the case counts as hung (the test's own timeout is
 * longer still); QUIET is how long to watch for a completion that must not come.
 */
#define TSC_PER_MS              3000000UL
#define HANG_MS                 10000UL
#define QUIET_MS                200UL
#define ARP_MS                  15000UL

static void put(const char *s)
{
        serial_puts(s);
}

static void put_dec(u32 v)
{
        serial_putdec(v);
}

static void put_hex(u64 v)
{
        char buf[19];
        int i = 18;
        buf[i] = 0;
        do {
                buf[--i] = "0123456789abcdef"[v & 15];
                v >>= 4;
        } while (v);
        buf[--i] = 'x';
        buf[--i] = '0';
        serial_puts(&buf[i]);
}

static void put_hex2(u8 v)
{
        char buf[3] = {"0123456789abcdef"[v >> 4], "0123456789abcdef"[v & 15], 0};
        serial_puts(buf);
}

static u32 mmio_read(u64 base, u32 off)
{
        return *(volatile u32 *)(base + off);
}

static void mmio_write(u64 base, u32 off, u32 value)
{
        *(volatile u32 *)(base + off) = value;
}

static u8 config_read8(u64 base, u32 off)
{
        return *(volatile u8 *)(base + MMIO_CONFIG + off);
}

static void fill(volatile void *p, u8 c, u64 n)
{
        volatile u8 *d = p;
        for (u64 i = 0; i < n; i++)
                d[i] = c;
}

static int all_bytes(const volatile void *p, u8 c, u64 n)
{
        const volatile u8 *s = p;
        for (u64 i = 0; i < n; i++)
                if (s[i] != c)
                        return 0;
        return 1;
}

/* ---- split virtqueues ----------------------------------------------------------------- */

struct desc {
        u64 addr;
        u32 len;
        u16 flags;
        u16 next;
};

struct avail {
        u16 flags;
        u16 idx;
        u16 ring[QSIZE];
        u16 used_event;
};

struct used_elem {
        u32 id;
        u32 len;
};

struct used {
        u16 flags;
        u16 idx;
        struct used_elem ring[QSIZE];
        u16 avail_event;
};

/* One page each for the descriptor table, the driver area and the device area. */
struct ring_pages {
        struct desc desc[QSIZE] __attribute__((aligned(4096)));
        struct avail avail __attribute__((aligned(4096)));
        struct used used __attribute__((aligned(4096)));
};

struct vq {
        u64 base;
        u32 index;
        volatile struct ring_pages *mem;
        u16 avail_idx;          /* next available index the driver publishes */
        u16 used_idx;           /* used entries consumed so far */
};

static struct ring_pages blk_rings __attribute__((aligned(4096)));
static struct ring_pages net_rx_rings __attribute__((aligned(4096)));
static struct ring_pages net_tx_rings __attribute__((aligned(4096)));

static struct vq blk_q, rx_q, tx_q;

static int fail(const char *what)
{
        put("FAIL: ");
        put(what);
        put("\n");
        return 1;
}

static void desc_set(struct vq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
        volatile struct desc *d = &q->mem->desc[i];
        d->addr = addr;
        d->len = len;
        d->flags = flags;
        d->next = next;
}

/* Makes `head` available (without notifying). */
static void publish(struct vq *q, u16 head)
{
        q->mem->avail.ring[q->avail_idx % QSIZE] = head;
        barrier();
        q->avail_idx++;
        q->mem->avail.idx = q->avail_idx;
}

static void notify(struct vq *q)
{
        mb();
        mmio_write(q->base, MMIO_QUEUE_NOTIFY, q->index);
}

/* Waits until the device has used `count` more chains than consumed; 0 on timeout. */
static int wait_used(struct vq *q, u16 count, u64 ms)
{
        u64 deadline = rdtsc() + ms * TSC_PER_MS;
        for (;;) {
                u16 idx = q->mem->used.idx;
                if ((u16)(idx - q->used_idx) >= count)
                        return 1;
                if (rdtsc() > deadline)
                        return 0;
                __asm__ volatile("pause");
        }
}

static u16 used_pending(struct vq *q)
{
        return (u16)(q->mem->used.idx - q->used_idx);
}

static void take_used(struct vq *q, u32 *id, u32 *len)
{
        barrier();
        volatile struct used_elem *e = &q->mem->used.ring[q->used_idx % QSIZE];
        *id = e->id;
        *len = e->len;
        q->used_idx++;
}

/* ---- device bring-up ---------------------------------------------------------------- */

static int setup_queue(struct vq *q, u64 base, u32 index, volatile struct ring_pages *mem)
{
        fill(mem, 0, sizeof(*mem));
        q->base = base;
        q->index = index;
        q->mem = mem;
        q->avail_idx = 0;
        q->used_idx = 0;
        mem->avail.flags = AVAIL_F_NO_INTERRUPT;

        mmio_write(base, MMIO_QUEUE_SEL, index);
        if (mmio_read(base, MMIO_QUEUE_READY) != 0)
                return fail("queue ready before it was set up");
        if (mmio_read(base, MMIO_QUEUE_NUM_MAX) < QSIZE)
                return fail("QueueNumMax smaller than 16");
        u64 desc = (u64)&mem->desc, avail = (u64)&mem->avail, used = (u64)&mem->used;
        mmio_write(base, MMIO_QUEUE_NUM, QSIZE);
        mmio_write(base, MMIO_QUEUE_DESC_LOW, (u32)desc);
        mmio_write(base, MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
        mmio_write(base, MMIO_QUEUE_DRIVER_LOW, (u32)avail);
        mmio_write(base, MMIO_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
        mmio_write(base, MMIO_QUEUE_DEVICE_LOW, (u32)used);
        mmio_write(base, MMIO_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
        mmio_write(base, MMIO_QUEUE_READY, 1);
        if (mmio_read(base, MMIO_QUEUE_READY) != 1)
                return fail("QueueReady does not read back 1");
        return 0;
}

/* The virtio 1.x initialisation sequence (3.1.1), VIRTIO_F_VERSION_1 only. */
static int init_device(u64 base, u32 device_id, const char *name, int queues,
                       struct vq *q0, volatile struct ring_pages *m0,
                       struct vq *q1, volatile struct ring_pages *m1)
{
        put(name);
        put(": ");
        if (mmio_read(base, MMIO_MAGIC) != MAGIC_VIRT)
                return fail("bad virtio-mmio magic");
        if (mmio_read(base, MMIO_VERSION) != 2)
                return fail("virtio-mmio version is not 2");
        if (mmio_read(base, MMIO_DEVICE_ID) != device_id)
                return fail("unexpected device id");

        mmio_write(base, MMIO_STATUS, 0);
        if (mmio_read(base, MMIO_STATUS) != 0)
                return fail("status not 0 after reset");
        mmio_write(base, MMIO_STATUS, S_ACKNOWLEDGE);
        mmio_write(base, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER);

        mmio_write(base, MMIO_DEVICE_FEATURES_SEL, 0);
        u64 features = mmio_read(base, MMIO_DEVICE_FEATURES);
        mmio_write(base, MMIO_DEVICE_FEATURES_SEL, 1);
        features |= (u64)mmio_read(base, MMIO_DEVICE_FEATURES) << 32;
        put("features ");
        put_hex(features);
        if (!(features >> 32 & F_VERSION_1_HIGH))
                return fail("VIRTIO_F_VERSION_1 not offered");

        mmio_write(base, MMIO_DRIVER_FEATURES_SEL, 1);
        mmio_write(base, MMIO_DRIVER_FEATURES, F_VERSION_1_HIGH);
        mmio_write(base, MMIO_DRIVER_FEATURES_SEL, 0);
        mmio_write(base, MMIO_DRIVER_FEATURES, 0);
        u32 status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
        mmio_write(base, MMIO_STATUS, status);
        if (mmio_read(base, MMIO_STATUS) != status)
                return fail("FEATURES_OK not accepted");

        if (setup_queue(q0, base, 0, m0))
                return 1;
        if (queues > 1 && setup_queue(q1, base, 1, m1))
                return 1;

        status |= S_DRIVER_OK;
        mmio_write(base, MMIO_STATUS, status);
        u32 got = mmio_read(base, MMIO_STATUS);
        put(", status ");
        put_hex(got);
        put("\n");
        if (got != status)
                return fail("DRIVER_OK not accepted (NEEDS_RESET or FAILED set)");
        return 0;
}

/* ---- virtio-blk -------------------------------------------------------------------- */

struct blk_header {
        u32 type;
        u32 ioprio;
        u64 sector;
};

static volatile struct blk_header blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status;
static volatile u8 blk_data[SECTOR] __attribute__((aligned(SECTOR)));
static u64 blk_capacity;
static int blk_case_no;

static void blk_header(u32 type, u64 sector)
{
        blk_hdr.type = type;
        blk_hdr.ioprio = 0;
        blk_hdr.sector = sector;
}

/* What a case expects back: the used length, and the status byte (NO_STATUS: untouched). */
#define ANY_LEN                 0xffffffffu
#define NO_STATUS               (-1)

/*
 * Posts the chain at descriptor 0 (already written), waits for it and checks the used
 * entry. Prints "blk case N (what): used len L status S".
 */
static int blk_run(const char *what, u32 want_len, int want_status)
{
        u32 id, len;
        blk_case_no++;
        put("blk case ");
        put_dec(blk_case_no);
        put(" (");
        put(what);
        put("): ");
        publish(&blk_q, 0);
        notify(&blk_q);
        if (!wait_used(&blk_q, 1, HANG_MS)) {
                put("hung\n");
                return fail("blk: hearth never returned the chain");
        }
        take_used(&blk_q, &id, &len);
        u8 status = blk_status;
        put("used len ");
        put_dec(len);
        put(" status ");
        put_dec(status);
        put("\n");
        if (id != 0)
                return fail("blk: used id is not the chain's head");
        if (want_len != ANY_LEN && len != want_len)
                return fail("blk: unexpected used length");
        if (want_status == NO_STATUS ? status != POISON : status != (u8)want_status)
                return fail("blk: unexpected status byte");
        return 0;
}

/* header -> data descriptors -> status, linked in order from descriptor 0. */
static void blk_chain3(u64 hdr_addr, u32 hdr_len, u16 hdr_flags,
                       u64 data_addr, u32 data_len, u16 data_flags,
                       u64 st_addr, u32 st_len, u16 st_flags)
{
        desc_set(&blk_q, 0, hdr_addr, hdr_len, hdr_flags | DESC_F_NEXT, 1);
        desc_set(&blk_q, 1, data_addr, data_len, data_flags | DESC_F_NEXT, 2);
        desc_set(&blk_q, 2, st_addr, st_len, st_flags, 0);
}

#define HDR                     ((u64)&blk_hdr)
#define DATA                    ((u64)blk_data)
#define STATUS                  ((u64)&blk_status)
#define W                       DESC_F_WRITE

/* A well-formed read or write of one sector through `blk_data`. */
static void blk_valid(u32 type, u64 sector)
{
        blk_header(type, sector);
        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, type == BLK_T_IN ? W : 0, STATUS, 1, W);
}

/* A read of `sector` that must succeed and return `c` in every byte. */
static int blk_read_expect(const char *what, u64 sector, u8 c)
{
        fill(blk_data, POISON, SECTOR);
        blk_valid(BLK_T_IN, sector);
        if (blk_run(what, SECTOR + 1, BLK_S_OK))
                return 1;
        if (!all_bytes(blk_data, c, SECTOR))
                return fail("blk: read returned the wrong data");
        return 0;
}

/* A read whose data buffer must stay untouched. */
static int blk_expect_untouched(void)
{
        if (!all_bytes(blk_data, POISON, SECTOR))
                return fail("blk: a failed request wrote into the data buffer");
        return 0;
}

#define CHECK(call)             do { if (call) return 1; } while (0)

static int blk_tests(void)
{
        if (init_device(VIRTIO_BLK_BASE, DEVICE_ID_BLOCK, "blk", 1, &blk_q, &blk_rings, 0, 0))
                return 1;
        blk_capacity = 0;
        for (int i = 7; i >= 0; i--)
                blk_capacity = blk_capacity << 8 | config_read8(VIRTIO_BLK_BASE, i);
        put("blk capacity ");
        put_dec((u32)blk_capacity);
        put(" sectors\n");
        if (blk_capacity < 3)
                return fail("blk: disk smaller than 3 sectors");

        /* Transport pokes that must be harmless: notify a queue that does not exist,
           select one and read it, write config space and unknown registers. */
        mmio_write(VIRTIO_BLK_BASE, MMIO_QUEUE_NOTIFY, 7);
        mmio_write(VIRTIO_BLK_BASE, MMIO_QUEUE_SEL, 0xffff);
        if (mmio_read(VIRTIO_BLK_BASE, MMIO_QUEUE_NUM_MAX) != 0)
                return fail("blk: a missing queue has a size");
        mmio_write(VIRTIO_BLK_BASE, MMIO_QUEUE_READY, 1);
        mmio_write(VIRTIO_BLK_BASE, MMIO_QUEUE_SEL, 0);
        mmio_write(VIRTIO_BLK_BASE, MMIO_CONFIG, 0xffffffff);
        mmio_write(VIRTIO_BLK_BASE, 0xffc, 0xffffffff);
        mmio_write(VIRTIO_BLK_BASE, 0x0c0, 0xffffffff);
        if (mmio_read(VIRTIO_BLK_BASE, MMIO_STATUS) != 0xf)
                return fail("blk: transport pokes changed the status");

        /* 1: a valid read: status OK, 512 bytes of 'A' and the status byte written. */
        CHECK(blk_read_expect("valid read of sector 0", 0, 'A'));

        /* Malformed requests that still have a usable status descriptor: IOERR, 1 byte. */
        fill(blk_data, POISON, SECTOR);
        blk_header(BLK_T_IN, 0);

        blk_status = POISON;
        blk_chain3(NO_RAM_ABOVE_4G, 16, 0, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("header beyond guest RAM", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        blk_chain3(VIRTIO_BLK_BASE, 16, 0, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("header in the device's MMIO window", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, 0, W, STATUS, 1, W);
        CHECK(blk_run("zero-length data descriptor", 1, BLK_S_IOERR));

        blk_status = POISON;
        blk_chain3(HDR, 16, W, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("header in a device-writable descriptor", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        blk_chain3(HDR, 8, 0, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("header shorter than 16 bytes", 1, BLK_S_IOERR));

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, 0xfffffe00, W, STATUS, 1, W);
        CHECK(blk_run("data length 0xfffffe00", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, NO_RAM_ABOVE_4G, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("data buffer beyond guest RAM", 1, BLK_S_IOERR));

        blk_status = POISON;
        fill((volatile void *)(RAM_END - 256), POISON, 256);
        blk_chain3(HDR, 16, 0, RAM_END - 256, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("data buffer straddling the end of RAM", 1, BLK_S_IOERR));
        if (!all_bytes((volatile void *)(RAM_END - 256), POISON, 256))
                return fail("blk: a refused read wrote the last bytes of RAM");

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, NO_RAM_HIGH, 0x10000, W, STATUS, 1, W);
        CHECK(blk_run("data buffer far outside guest RAM", 1, BLK_S_IOERR));

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, 0, STATUS, 1, W);
        CHECK(blk_run("read into a device-readable buffer", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_header(BLK_T_IN, 1UL << 40);
        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("sector far beyond the capacity", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_header(BLK_T_IN, 0xffffffffffffffffUL / SECTOR + 1);
        blk_status = POISON;
        CHECK(blk_run("sector * 512 overflows", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_header(BLK_T_IN, blk_capacity - 1);
        blk_status = POISON;
        desc_set(&blk_q, 0, HDR, 16, DESC_F_NEXT, 1);
        desc_set(&blk_q, 1, DATA, SECTOR, W | DESC_F_NEXT, 2);
        desc_set(&blk_q, 2, DATA, SECTOR, W | DESC_F_NEXT, 3);
        desc_set(&blk_q, 3, STATUS, 1, W, 0);
        CHECK(blk_run("two sectors from the last one", 1, BLK_S_IOERR));
        CHECK(blk_expect_untouched());

        blk_header(0x1234, 0);
        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, W, STATUS, 1, W);
        CHECK(blk_run("unknown request type", 1, BLK_S_UNSUPP));
        CHECK(blk_expect_untouched());

        /* Chains without a usable status descriptor: returned with length 0, no status. */
        blk_header(BLK_T_IN, 0);
        blk_status = POISON;
        desc_set(&blk_q, 0, HDR, 16, DESC_F_NEXT, 0);
        CHECK(blk_run("descriptor looping to itself", 0, NO_STATUS));

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, W, STATUS, 1, W | DESC_F_NEXT);
        blk_q.mem->desc[2].next = 1;
        CHECK(blk_run("loop from the status back to the data", 0, NO_STATUS));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, SECTOR, W, STATUS, 1, W);
        blk_q.mem->desc[1].next = 200;
        CHECK(blk_run("next index beyond the queue", 0, NO_STATUS));
        CHECK(blk_expect_untouched());

        blk_status = POISON;
        desc_set(&blk_q, 0, NO_RAM_ABOVE_4G, 16 * 4, DESC_F_INDIRECT, 0);
        CHECK(blk_run("indirect table (not negotiated) beyond RAM", 0, NO_STATUS));

        blk_status = POISON;
        desc_set(&blk_q, 0, (u64)&blk_q.mem->desc[4], 20, DESC_F_INDIRECT, 0);
        CHECK(blk_run("indirect table of 20 bytes", 0, NO_STATUS));

        blk_status = POISON;
        desc_set(&blk_q, 0, HDR, 16, 0, 0);
        CHECK(blk_run("header only", 0, NO_STATUS));

        /* virtio-queue ends a chain whose lengths add up past 4 GiB (the driver must not
           build one) at the descriptor before: the header, which still points onward. */
        blk_status = POISON;
        blk_chain3(HDR, 16, 0, DATA, 0xffffffff, W, STATUS, 1, W);
        CHECK(blk_run("data length 0xffffffff (chain past 4 GiB)", 0, NO_STATUS));
        CHECK(blk_expect_untouched());

        /* A write of 'Z' to sector 2 whose status descriptor the device cannot write:
           nothing may happen (the test checks that sector 2 is unchanged). */
        fill(blk_data, 'Z', SECTOR);
        blk_valid(BLK_T_OUT, 2);
        blk_q.mem->desc[2].flags = 0;
        CHECK(blk_run("write with a read-only status descriptor", 0, NO_STATUS));

        blk_valid(BLK_T_OUT, 2);
        blk_q.mem->desc[2].addr = NO_RAM_ABOVE_4G;
        CHECK(blk_run("write with the status beyond RAM", 0, NO_STATUS));

        blk_valid(BLK_T_OUT, 2);
        blk_q.mem->desc[2].len = 0;
        CHECK(blk_run("write with a zero-length status", 0, NO_STATUS));

        /* A valid write of 'X' to sector 1. */
        fill(blk_data, 'X', SECTOR);
        blk_valid(BLK_T_OUT, 1);
        CHECK(blk_run("valid write of sector 1", 1, BLK_S_OK));

        /* A head index beyond the queue and a valid read in one notification: the bad head
           cannot be returned (its id would mean nothing), the read must complete. */
        blk_case_no++;
        put("blk case ");
        put_dec(blk_case_no);
        put(" (head index beyond the queue, then a valid read): ");
        fill(blk_data, POISON, SECTOR);
        blk_valid(BLK_T_IN, 1);
        publish(&blk_q, 0x7fff);
        publish(&blk_q, 0);
        notify(&blk_q);
        if (!wait_used(&blk_q, 1, HANG_MS)) {
                put("hung\n");
                return fail("blk: the read after a bad head index never completed");
        }
        wait_used(&blk_q, 2, QUIET_MS);
        u16 extra = used_pending(&blk_q);
        u32 id, len;
        take_used(&blk_q, &id, &len);
        put("used ");
        put_dec(extra);
        put(", id ");
        put_dec(id);
        put(" len ");
        put_dec(len);
        put(" status ");
        put_dec(blk_status);
        put("\n");
        if (id != 0 || len != SECTOR + 1 || blk_status != BLK_S_OK || !all_bytes(blk_data, 'X', SECTOR))
                return fail("blk: the valid read after a bad head index went wrong");
        if (extra != 1)
                return fail("blk: hearth returned a head index beyond the queue");

        /* An available index far ahead of the ring: nothing can be popped. Then the
           driver puts the index right again and the device carries on. */
        blk_case_no++;
        put("blk case ");
        put_dec(blk_case_no);
        put(" (available index 1000 ahead): ");
        blk_q.mem->avail.idx = blk_q.avail_idx + 1000;
        notify(&blk_q);
        wait_used(&blk_q, 1, QUIET_MS);
        put("used ");
        put_dec(used_pending(&blk_q));
        put("\n");
        if (used_pending(&blk_q) != 0)
                return fail("blk: hearth used chains from a bogus available index");
        blk_q.mem->avail.idx = blk_q.avail_idx;
        CHECK(blk_read_expect("valid read after the index was fixed", 0, 'A'));

        /* The device still works: read back the sector written above. */
        CHECK(blk_read_expect("final read of sector 1", 1, 'X'));

        /* Reset the device and bring it up again on fresh rings. */
        mmio_write(VIRTIO_BLK_BASE, MMIO_STATUS, 0);
        if (mmio_read(VIRTIO_BLK_BASE, MMIO_STATUS) != 0)
                return fail("blk: status not 0 after reset");
        if (init_device(VIRTIO_BLK_BASE, DEVICE_ID_BLOCK, "blk again", 1, &blk_q, &blk_rings, 0, 0))
                return 1;
        CHECK(blk_read_expect("read of sector 0 after a reset", 0, 'A'));
        put("blk ok\n");
        return 0;
}

/* ---- virtio-net -------------------------------------------------------------------- */

#define VNET_HDR_LEN            12
#define RX_BUF_LEN              2048
#define RX_BAD                  4       /* malformed RX chains, heads 0 .. RX_BAD - 1 */
#define RX_GOOD                 6       /* valid RX buffers, heads RX_BAD .. */
/* The host side of the tap answers ARP for host_ip (link-local, as in tests/virtio_net.rs). */
static const u8 host_ip[4] = {169, 254, 77, 1};
static const u8 guest_ip[4] = {169, 254, 77, 2};

static volatile u8 tx_frame[VNET_HDR_LEN + 60] __attribute__((aligned(64)));
static volatile u8 rx_bufs[RX_GOOD][RX_BUF_LEN] __attribute__((aligned(64)));
static u8 mac[6];
static int tx_case_no;

/* virtio_net_hdr_v1 (all zero: no offloads) and an ARP request for host_ip. */
static void build_arp_request(void)
{
        volatile u8 *f = tx_frame;
        fill(f, 0, sizeof(tx_frame));
        volatile u8 *eth = f + VNET_HDR_LEN;
        for (int i = 0; i < 6; i++) {
                eth[i] = 0xff;
                eth[6 + i] = mac[i];
        }
        eth[12] = 0x08;
        eth[13] = 0x06;
        volatile u8 *arp = eth + 14;
        arp[1] = 1;             /* htype Ethernet */
        arp[2] = 0x08;          /* ptype IPv4 */
        arp[4] = 6;
        arp[5] = 4;
        arp[7] = 1;             /* request */
        for (int i = 0; i < 6; i++)
                arp[8 + i] = mac[i];
        for (int i = 0; i < 4; i++) {
                arp[14 + i] = guest_ip[i];
                arp[24 + i] = host_ip[i];
        }
}

/* Posts the TX chain at descriptor 0 and checks it comes back (TX chains: length 0). */
static int tx_run(const char *what)
{
        u32 id, len;
        tx_case_no++;
        put("net tx case ");
        put_dec(tx_case_no);
        put(" (");
        put(what);
        put("): ");
        publish(&tx_q, 0);
        notify(&tx_q);
        if (!wait_used(&tx_q, 1, HANG_MS)) {
                put("hung\n");
                return fail("net: hearth never returned the TX chain");
        }
        take_used(&tx_q, &id, &len);
        put("used len ");
        put_dec(len);
        put("\n");
        if (id != 0)
                return fail("net: TX used id is not the chain's head");
        if (len != 0)
                return fail("net: TX used length is not 0");
        return 0;
}

#define FRAME                   ((u64)tx_frame)
#define FRAME_LEN               ((u32)sizeof(tx_frame))

/* Whether the RX buffer holds the host's ARP reply to our request. */
static int is_arp_reply(volatile u8 *buf, u32 len)
{
        volatile u8 *eth = buf + VNET_HDR_LEN;
        if (len < VNET_HDR_LEN + 42)
                return 0;
        for (int i = 0; i < 6; i++)
                if (eth[i] != mac[i])
                        return 0;
        if (eth[12] != 0x08 || eth[13] != 0x06 || eth[20] != 0 || eth[21] != 2)
                return 0;
        for (int i = 0; i < 4; i++)
                if (eth[28 + i] != host_ip[i] || eth[38 + i] != guest_ip[i])
                        return 0;
        return 1;
}

static int net_tests(void)
{
        if (init_device(VIRTIO_NET_BASE, DEVICE_ID_NET, "net", 2, &rx_q, &net_rx_rings,
                        &tx_q, &net_tx_rings))
                return 1;
        put("net mac ");
        for (int i = 0; i < 6; i++) {
                mac[i] = config_read8(VIRTIO_NET_BASE, i);
                put_hex2(mac[i]);
                put(i < 5 ? ":" : "\n");
        }

        /* RX buffers, malformed ones first: the device takes them in ring order when the
           first frame arrives, returns the malformed ones with length 0 and fills the
           first valid one. */
        desc_set(&rx_q, 0, (u64)rx_bufs[0], RX_BUF_LEN, 0, 0);          /* device-readable */
        desc_set(&rx_q, 1, NO_RAM_ABOVE_4G, RX_BUF_LEN, W, 0);          /* beyond RAM */
        desc_set(&rx_q, 2, (u64)rx_bufs[0], 8, W, 0);                   /* smaller than a header */
        desc_set(&rx_q, 3, (u64)rx_bufs[0], RX_BUF_LEN, W | DESC_F_NEXT, 3); /* a loop */
        for (u16 i = 0; i < RX_BAD; i++)
                publish(&rx_q, i);
        for (u16 i = 0; i < RX_GOOD; i++) {
                desc_set(&rx_q, RX_BAD + i, (u64)rx_bufs[i], RX_BUF_LEN, W, 0);
                publish(&rx_q, RX_BAD + i);
        }
        notify(&rx_q);

        /* TX: every chain comes back with length 0, sent or dropped. */
        build_arp_request();
        desc_set(&tx_q, 0, FRAME, VNET_HDR_LEN, DESC_F_NEXT, 1);
        desc_set(&tx_q, 1, FRAME + VNET_HDR_LEN, FRAME_LEN - VNET_HDR_LEN, 0, 0);
        CHECK(tx_run("valid ARP request, header and frame in two descriptors"));

        desc_set(&tx_q, 0, FRAME, VNET_HDR_LEN, 0, 0);
        CHECK(tx_run("header only"));

        desc_set(&tx_q, 0, FRAME, 0, 0, 0);
        CHECK(tx_run("zero-length descriptor"));

        desc_set(&tx_q, 0, FRAME, FRAME_LEN, W, 0);
        CHECK(tx_run("device-writable descriptor"));

        desc_set(&tx_q, 0, NO_RAM_ABOVE_4G, FRAME_LEN, 0, 0);
        CHECK(tx_run("frame beyond guest RAM"));

        desc_set(&tx_q, 0, VIRTIO_NET_BASE, FRAME_LEN, 0, 0);
        CHECK(tx_run("frame in the device's MMIO window"));

        desc_set(&tx_q, 0, FRAME, 0xffffffff, 0, 0);
        CHECK(tx_run("length 0xffffffff"));

        desc_set(&tx_q, 0, FRAME, 0x80000000, DESC_F_NEXT, 1);
        desc_set(&tx_q, 1, FRAME, 0x80000000, 0, 0);
        CHECK(tx_run("lengths adding up past 4 GiB"));

        desc_set(&tx_q, 0, FRAME, FRAME_LEN, DESC_F_NEXT, 0);
        CHECK(tx_run("descriptor looping to itself"));

        desc_set(&tx_q, 0, FRAME, VNET_HDR_LEN, DESC_F_NEXT, 1);
        desc_set(&tx_q, 1, FRAME + VNET_HDR_LEN, FRAME_LEN - VNET_HDR_LEN, DESC_F_NEXT, 0);
        CHECK(tx_run("two-descriptor loop"));

        desc_set(&tx_q, 0, FRAME, VNET_HDR_LEN, DESC_F_NEXT, 300);
        CHECK(tx_run("next index beyond the queue"));

        desc_set(&tx_q, 0, NO_RAM_ABOVE_4G, 16 * 4, DESC_F_INDIRECT, 0);
        CHECK(tx_run("indirect table (not negotiated) beyond RAM"));

        tx_frame[1] = 0x55;     /* gso_type nobody negotiated */
        desc_set(&tx_q, 0, FRAME, FRAME_LEN, 0, 0);
        CHECK(tx_run("unknown GSO type"));
        tx_frame[1] = 0;
        tx_frame[0] = 1;        /* NEEDS_CSUM without VIRTIO_NET_F_CSUM */
        CHECK(tx_run("checksum offload not negotiated"));
        tx_frame[0] = 0;

        /* A bad head index and a valid frame in one notification. */
        put("net tx case ");
        put_dec(++tx_case_no);
        put(" (head index beyond the queue, then a valid frame): ");
        desc_set(&tx_q, 0, FRAME, FRAME_LEN, 0, 0);
        publish(&tx_q, 0xffff);
        publish(&tx_q, 0);
        notify(&tx_q);
        if (!wait_used(&tx_q, 1, HANG_MS)) {
                put("hung\n");
                return fail("net: the frame after a bad head index never came back");
        }
        wait_used(&tx_q, 2, QUIET_MS);
        u16 extra = used_pending(&tx_q);
        u32 id, len;
        take_used(&tx_q, &id, &len);
        put("used ");
        put_dec(extra);
        put(", id ");
        put_dec(id);
        put("\n");
        if (id != 0 || extra != 1)
                return fail("net: unexpected TX used entries around a bad head index");

        put("net tx case ");
        put_dec(++tx_case_no);
        put(" (available index 1000 ahead): ");
        tx_q.mem->avail.idx = tx_q.avail_idx + 1000;
        notify(&tx_q);
        wait_used(&tx_q, 1, QUIET_MS);
        put("used ");
        put_dec(used_pending(&tx_q));
        put("\n");
        if (used_pending(&tx_q) != 0)
                return fail("net: hearth used TX chains from a bogus available index");
        tx_q.mem->avail.idx = tx_q.avail_idx;
        desc_set(&tx_q, 0, FRAME, FRAME_LEN, 0, 0);
        CHECK(tx_run("valid frame after the index was fixed"));

        /* RX: the malformed buffers come back empty, then the host's ARP reply arrives in
           a valid one (other traffic, e.g. IPv6, may come first: buffers are recycled). */
        int bad_seen = 0, got_reply = 0, frames = 0;
        u64 deadline = rdtsc() + ARP_MS * TSC_PER_MS;
        while (!got_reply && rdtsc() < deadline) {
                if (!used_pending(&rx_q)) {
                        __asm__ volatile("pause");
                        continue;
                }
                take_used(&rx_q, &id, &len);
                if (bad_seen < RX_BAD) {
                        put("net rx malformed buffer ");
                        put_dec(id);
                        put(": used len ");
                        put_dec(len);
                        put("\n");
                        if (id != (u32)bad_seen || len != 0)
                                return fail("net: malformed RX buffers not returned empty, in order");
                        bad_seen++;
                        continue;
                }
                if (id < RX_BAD || id >= RX_BAD + RX_GOOD || len > RX_BUF_LEN || len < VNET_HDR_LEN)
                        return fail("net: bad RX used entry");
                frames++;
                got_reply = is_arp_reply(rx_bufs[id - RX_BAD], len);
                put("net rx frame: used len ");
                put_dec(len);
                put(got_reply ? " (ARP reply)\n" : "\n");
                publish(&rx_q, (u16)id);
                notify(&rx_q);
        }
        if (!got_reply)
                return fail("net: no ARP reply received");

        /* Reset the NIC, bring it up again and send once more. */
        mmio_write(VIRTIO_NET_BASE, MMIO_STATUS, 0);
        if (mmio_read(VIRTIO_NET_BASE, MMIO_STATUS) != 0)
                return fail("net: status not 0 after reset");
        if (init_device(VIRTIO_NET_BASE, DEVICE_ID_NET, "net again", 2, &rx_q, &net_rx_rings,
                        &tx_q, &net_tx_rings))
                return 1;
        desc_set(&tx_q, 0, FRAME, FRAME_LEN, 0, 0);
        CHECK(tx_run("valid frame after a reset"));
        put("net ok\n");
        return 0;
}

int payload_main(void)
{
        put("virtio_evil start\n");
        if (blk_tests())
                return 1;
        if (net_tests())
                return 1;
        put("virtio_evil done\n");
        return 0;
}
