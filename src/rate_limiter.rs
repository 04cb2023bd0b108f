//! Token-bucket rate limiters for the virtio devices, with Firecracker's semantics.
//!
//! A limiter has up to two buckets: `bandwidth` counts bytes and `ops` counts operations
//! (requests, frames). Each bucket holds at most `size` tokens and refills from empty to
//! full in `refill_time` milliseconds, continuously; `one_time_burst` tokens are spent
//! first and never come back. A bucket of size 0 or refill time 0 limits nothing, and so
//! does a missing one.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request. When a bucket runs
//! dry the limiter arms its timerfd for the moment the missing tokens will be there and
//! refuses everything until the device's event loop sees the timer fire and calls
//! [`RateLimiter::on_timer`]: the device leaves the request where it was (back on its
//! ring, or pending) and the event loop sleeps meanwhile, never busy-waits. A request
//! larger than a whole bucket can never fit, so it goes through at once and leaves the
//! bucket in debt, which later refills pay first (and the limiter blocks until they
//! have): big requests cost what they cost, and are not starved.
//!
//! [`RateLimiterConfig`] is the inert configuration (Firecracker's `rate_limiter` JSON
//! object), shared by the CLI, the config file, the API and the snapshot state.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use vmm_sys_util::timerfd::TimerFd;

/// The shortest wait the timer is armed for, so a nearly full bucket costs at most a
/// thousand wake-ups a second.
const MIN_WAIT: Duration = Duration::from_millis(1);
const NANOS_PER_MILLI: u128 = 1_000_000;

/// One token bucket as configured (Firecracker's `TokenBucket` object). In JSON an absent
/// burst is left out (see [`RateLimiterConfig`]'s `Serialize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// A bucket that refills `rate` tokens every second, with an optional one-time burst.
    pub fn per_second(rate: u64, burst: Option<u64>) -> Self {
        Self {
            size: rate,
            one_time_burst: burst,
            refill_time: 1000,
        }
    }

    /// Whether the bucket limits anything: size 0 or refill time 0 means no bucket.
    pub fn limits(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }
}

/// A rate limiter as configured (Firecracker's `RateLimiter` object): `bandwidth` in
/// bytes, `ops` in operations. The default limits nothing, and is `{}` in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// `banwidth` is how firecracker-rs-sdk 0.1 spells it; taking it too lets that
    /// client set a bandwidth limit at all.
    #[serde(default, alias = "banwidth")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether any bucket limits anything (clients send empty objects, which do not).
    pub fn limits_anything(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.limits()) || self.ops.is_some_and(|b| b.limits())
    }

    /// Firecracker's update rule (`PATCH`): a bucket given replaces this one's (a bucket
    /// of size 0 or refill time 0 removes it); an omitted one stays.
    pub fn updated(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        let pick = |old: Option<TokenBucketConfig>, new: Option<TokenBucketConfig>| match new {
            Some(bucket) if bucket.limits() => Some(bucket),
            Some(_) => None,
            None => old,
        };
        RateLimiterConfig {
            bandwidth: pick(self.bandwidth, update.bandwidth),
            ops: pick(self.ops, update.ops),
        }
    }

    /// The same limiter without its buckets that limit nothing, so that equal limiters
    /// compare equal.
    pub fn normalized(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.filter(TokenBucketConfig::limits),
            ops: self.ops.filter(TokenBucketConfig::limits),
        }
    }
}

// Absent options are left out of human-readable output (JSON config files and API
// answers stay short) but always written in binary encodings: postcard, which snapshots
// use, has no field names and must see every field, in the order `Deserialize` reads them.

impl Serialize for TokenBucketConfig {
    fn serialize<S: Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        let skip_burst = out.is_human_readable() && self.one_time_burst.is_none();
        let mut state = out.serialize_struct("TokenBucketConfig", 3 - usize::from(skip_burst))?;
        state.serialize_field("size", &self.size)?;
        if skip_burst {
            state.skip_field("one_time_burst")?;
        } else {
            state.serialize_field("one_time_burst", &self.one_time_burst)?;
        }
        state.serialize_field("refill_time", &self.refill_time)?;
        state.end()
    }
}

impl Serialize for RateLimiterConfig {
    fn serialize<S: Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        let human = out.is_human_readable();
        let fields = [("bandwidth", &self.bandwidth), ("ops", &self.ops)];
        let len = fields
            .iter()
            .filter(|(_, bucket)| !human || bucket.is_some())
            .count();
        let mut state = out.serialize_struct("RateLimiterConfig", len)?;
        for (key, bucket) in fields {
            if human && bucket.is_none() {
                state.skip_field(key)?;
            } else {
                state.serialize_field(key, bucket)?;
            }
        }
        state.end()
    }
}

/// Which bucket a consumption is taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Bytes,
    Ops,
}

/// What taking tokens from a bucket did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reduction {
    /// Taken.
    Taken,
    /// Not taken: the tokens will be there after this long.
    Wait(Duration),
    /// Taken although more than the bucket holds: it is in debt for this long.
    Overdrawn(Duration),
}

/// One live bucket. Time is passed in, so tests need no clock.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TokenBucket {
    size: u64,
    /// Nanoseconds to refill `size` tokens (milliseconds × 10⁶ always fits a u128).
    refill_ns: u128,
    budget: u64,
    burst: u64,
    /// Tokens taken beyond the budget; refills pay them back before the budget grows.
    debt: u64,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` for one that limits nothing.
    fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        config.limits().then(|| Self {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * NANOS_PER_MILLI,
            budget: config.size,
            burst: config.one_time_burst.unwrap_or(0),
            debt: 0,
            last_refill: now,
        })
    }

    /// Adds the tokens earned since the last refill. Only the time whole tokens stand for
    /// is used up, so slow rates lose no fraction of a token between calls.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        let size = u128::from(self.size);
        // An overflow needs centuries at the largest sizes: the bucket is full by then.
        let earned = elapsed
            .checked_mul(size)
            .map_or(u128::MAX, |product| product / self.refill_ns);
        if earned == 0 {
            return;
        }
        let missing = u128::from(self.debt) + u128::from(self.size - self.budget);
        if earned >= missing {
            self.debt = 0;
            self.budget = self.size;
            self.last_refill = now;
            return;
        }
        // `earned < missing`, which is at most 2 × u64::MAX: the parts below fit a u64.
        let paid = earned.min(u128::from(self.debt));
        self.debt -= paid as u64;
        self.budget += (earned - paid) as u64;
        match earned.checked_mul(self.refill_ns) {
            Some(product) => {
                let used = u64::try_from(product / size).unwrap_or(u64::MAX);
                self.last_refill += Duration::from_nanos(used);
            }
            None => self.last_refill = now,
        }
    }

    /// How long refilling `tokens` takes, at least [`MIN_WAIT`].
    fn time_for(&self, tokens: u128) -> Duration {
        let size = u128::from(self.size);
        let nanos = tokens
            .checked_mul(self.refill_ns)
            .map_or(u128::MAX, |product| product.div_ceil(size));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).max(MIN_WAIT)
    }

    fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        self.refill(now);
        let available = self.burst.saturating_add(self.budget);
        if self.debt == 0 && tokens <= available {
            let from_burst = tokens.min(self.burst);
            self.burst -= from_burst;
            self.budget -= tokens - from_burst;
            return Reduction::Taken;
        }
        let never_fits = tokens > self.size.saturating_add(self.burst);
        if self.debt == 0 && never_fits {
            // Everything there is, and the rest on credit.
            self.debt = tokens - available;
            self.burst = 0;
            self.budget = 0;
            return Reduction::Overdrawn(self.time_for(u128::from(self.debt)));
        }
        let short = u128::from(self.debt) + u128::from(tokens.saturating_sub(available));
        // A request that never fits waits for a full bucket, then goes on credit.
        let short = short.min(u128::from(self.debt) + u128::from(self.size - self.budget));
        Reduction::Wait(self.time_for(short))
    }

    /// Gives back tokens taken for a request that did not go after all.
    fn replenish(&mut self, tokens: u64) {
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        self.budget = self.budget.saturating_add(tokens - paid).min(self.size);
    }
}

/// A live rate limiter: its buckets, the timer that ends a throttle, and how often it
/// throttled.
pub struct RateLimiter {
    config: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer is armed: everything is refused until it fires.
    blocked: bool,
    throttled: u64,
    /// Whether the timer is in the event loop's epoll set.
    watched: bool,
}

impl RateLimiter {
    /// A limiter with full buckets. The timer exists even when nothing is limited, so a
    /// limit set on a running device needs no new watch.
    pub fn new(config: &RateLimiterConfig) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(io::Error::from)?;
        // Non-blocking: a stale readiness report must never stall the event loop.
        // SAFETY: F_GETFL and F_SETFL only change the flags of a descriptor this limiter owns.
        let result = unsafe {
            let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        let now = Instant::now();
        Ok(Self {
            config: config.normalized(),
            bandwidth: config.bandwidth.and_then(|b| TokenBucket::new(&b, now)),
            ops: config.ops.and_then(|b| TokenBucket::new(&b, now)),
            timer,
            blocked: false,
            throttled: 0,
            watched: false,
        })
    }

    /// The configuration in force (buckets that limit nothing left out).
    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    /// Whether any bucket limits anything.
    pub fn limits_anything(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Applies `update` with Firecracker's rule ([`RateLimiterConfig::updated`]): a bucket
    /// given starts anew, full; an omitted one keeps its state. Any throttle ends, so the
    /// device should serve its queue again at once.
    pub fn update(&mut self, update: &RateLimiterConfig) {
        let now = Instant::now();
        let replace = |bucket: &mut Option<TokenBucket>, new: Option<TokenBucketConfig>| {
            if let Some(new) = new {
                *bucket = TokenBucket::new(&new, now);
            }
        };
        replace(&mut self.bandwidth, update.bandwidth);
        replace(&mut self.ops, update.ops);
        self.config = self.config.updated(update);
        if self.blocked {
            if let Err(e) = self.timer.clear() {
                log::warn!("rate limiter: cannot disarm the timer: {e}");
            }
            self.drain_timer();
            self.blocked = false;
        }
    }

    /// Takes `tokens` from the bucket of `kind`. `false`: the request must wait, and the
    /// timer is armed for when it can go.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => &mut self.bandwidth,
            TokenType::Ops => &mut self.ops,
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.reduce(tokens, Instant::now()) {
            Reduction::Taken => true,
            Reduction::Wait(wait) => {
                self.block(wait);
                false
            }
            Reduction::Overdrawn(wait) => {
                self.block(wait);
                true
            }
        }
    }

    /// Gives back tokens a request took before another bucket refused it.
    pub fn replenish(&mut self, tokens: u64, kind: TokenType) {
        let bucket = match kind {
            TokenType::Bytes => &mut self.bandwidth,
            TokenType::Ops => &mut self.ops,
        };
        if let Some(bucket) = bucket {
            bucket.replenish(tokens);
        }
    }

    /// One request of `bytes` bytes: one operation and its bytes, both or neither.
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        if !self.consume(1, TokenType::Ops) {
            return false;
        }
        if !self.consume(bytes, TokenType::Bytes) {
            self.replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// True while the limiter waits for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// How many times a request had to wait (or left a bucket in debt) since the device
    /// was built.
    pub fn throttled_events(&self) -> u64 {
        self.throttled
    }

    /// The timer fired (its fd was readable): requests may be tried again. Returns whether
    /// the limiter was blocked, i.e. whether the device has something to retry.
    pub fn on_timer(&mut self) -> bool {
        self.drain_timer();
        std::mem::replace(&mut self.blocked, false)
    }

    /// Puts the timer in the event loop's epoll set with `token` as its data, or takes it
    /// out (`want` false, while the device is paused).
    pub fn sync_watch(&mut self, ops: &mut EventOps, token: u32, want: bool, device: &str) {
        if want == self.watched {
            return;
        }
        let events = Events::with_data(&self.timer, token, EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watched = want,
            Err(e) => log::error!("{device}: cannot update the watch on its rate limiter: {e}"),
        }
    }

    fn block(&mut self, wait: Duration) {
        self.throttled += 1;
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would end the throttle: let requests through.
            Err(e) => log::error!("rate limiter: cannot arm the timer: {e}"),
        }
    }

    /// Consumes the timer's expiry count; an empty count is not an error worth reporting.
    fn drain_timer(&mut self) {
        let _ = self.timer.wait();
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("blocked", &self.blocked)
            .field("throttled", &self.throttled)
            .finish()
    }
}

#[cfg(test)]
mod tests;
