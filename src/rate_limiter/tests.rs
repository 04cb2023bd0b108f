use super::*;

fn bucket(size: u64, burst: Option<u64>, refill_time: u64, now: Instant) -> TokenBucket {
    TokenBucket::new(
        &TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time,
        },
        now,
    )
    .unwrap()
}

/// A bucket that refills so slowly that a test never sees a token come back.
fn per_hour(size: u64, burst: Option<u64>) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: burst,
        refill_time: 3_600_000,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn limiter(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> RateLimiter {
    RateLimiter::new(&RateLimiterConfig { bandwidth, ops }).unwrap()
}

/// Waits up to `timeout` for the limiter's timer to fire.
fn timer_fires(limiter: &RateLimiter, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd: limiter.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is one valid entry that poll may write `revents` into.
    let n = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
    n == 1
}

#[test]
fn refills_in_proportion_to_the_time_elapsed() {
    let t0 = Instant::now();
    let mut b = bucket(1000, None, 1000, t0);
    assert_eq!(b.reduce(1000, t0), Reduction::Taken);
    // One token short: its time, but at least the minimum wait.
    assert_eq!(b.reduce(1, t0), Reduction::Wait(MIN_WAIT));
    assert_eq!(b.reduce(300, t0), Reduction::Wait(ms(300)));
    assert_eq!(b.reduce(500, t0 + ms(500)), Reduction::Taken);
    assert_eq!(b.budget, 0);
    assert_eq!(b.reduce(250, t0 + ms(750)), Reduction::Taken);
    // Never more than full, however long the bucket waits.
    b.refill(t0 + Duration::from_secs(3600));
    assert_eq!(b.budget, 1000);
}

/// Three tokens a second, refilled at times that fall between tokens: by the second's end
/// all three are back (no fraction is lost at each refill).
#[test]
fn slow_rates_lose_no_fraction_of_a_token() {
    let t0 = Instant::now();
    let mut b = bucket(3, None, 1000, t0);
    assert_eq!(b.reduce(3, t0), Reduction::Taken);
    for at in [200, 400, 700, 900] {
        b.refill(t0 + ms(at));
    }
    assert_eq!(b.budget, 2);
    b.refill(t0 + ms(1000));
    assert_eq!(b.budget, 3);
    // And the wait for a token rounds up, never down.
    let mut b = bucket(3, None, 1000, t0);
    assert_eq!(b.reduce(3, t0), Reduction::Taken);
    assert_eq!(
        b.reduce(1, t0),
        Reduction::Wait(Duration::from_nanos(333_333_334))
    );
}

#[test]
fn the_one_time_burst_is_spent_first_and_once() {
    let t0 = Instant::now();
    let mut b = bucket(100, Some(50), 1000, t0);
    assert_eq!(b.reduce(150, t0), Reduction::Taken);
    assert_eq!((b.burst, b.budget), (0, 0));
    let later = t0 + Duration::from_secs(10);
    // Without the burst, 150 is more than the bucket ever holds.
    assert_eq!(b.reduce(150, later), Reduction::Overdrawn(ms(500)));
    assert_eq!(b.reduce(1, later), Reduction::Wait(ms(510)));
}

#[test]
fn a_request_larger_than_the_bucket_goes_on_credit() {
    let t0 = Instant::now();
    let mut b = bucket(100, None, 1000, t0);
    assert_eq!(b.reduce(250, t0), Reduction::Overdrawn(ms(1500)));
    // The debt is paid before anything else goes.
    assert_eq!(b.reduce(1, t0 + ms(1000)), Reduction::Wait(ms(510)));
    assert_eq!(b.reduce(10, t0 + ms(1600)), Reduction::Taken);
    // Also from a partial budget; in debt, it waits for the debt and a full bucket.
    let mut b = bucket(100, None, 1000, t0);
    assert_eq!(b.reduce(60, t0), Reduction::Taken);
    assert_eq!(b.reduce(1000, t0), Reduction::Overdrawn(ms(9600)));
    assert_eq!(b.reduce(1000, t0), Reduction::Wait(ms(10600)));
    // Giving tokens back pays the debt first, and never overfills.
    b.replenish(960);
    assert_eq!((b.debt, b.budget), (0, 0));
    b.replenish(u64::MAX);
    assert_eq!(b.budget, 100);
}

#[test]
fn huge_values_do_not_overflow() {
    let t0 = Instant::now();
    let mut b = bucket(u64::MAX, Some(u64::MAX), u64::MAX, t0);
    assert_eq!(b.reduce(u64::MAX, t0), Reduction::Taken);
    assert_eq!(b.reduce(u64::MAX, t0), Reduction::Taken);
    assert!(matches!(b.reduce(u64::MAX, t0), Reduction::Wait(_)));
    b.refill(t0 + Duration::from_secs(1 << 40));
    // One token a year at most: a wait that does not fit in nanoseconds is capped.
    let mut slow = bucket(1, None, u64::MAX, t0);
    assert_eq!(slow.reduce(1, t0), Reduction::Taken);
    assert_eq!(
        slow.reduce(1, t0),
        Reduction::Wait(Duration::from_nanos(u64::MAX))
    );
    slow.refill(t0 + Duration::from_secs(1 << 40));
    assert_eq!(slow.budget, 0);
    // A huge size with a short refill time: a long idle period fills it without overflow.
    let mut fast = bucket(u64::MAX, None, 1, t0);
    assert_eq!(fast.reduce(u64::MAX, t0), Reduction::Taken);
    fast.refill(t0 + Duration::from_secs(1 << 40));
    assert_eq!(fast.budget, u64::MAX);
    assert!(matches!(
        fast.reduce(u64::MAX, t0),
        Reduction::Taken | Reduction::Wait(_)
    ));
}

#[test]
fn zero_and_absent_buckets_limit_nothing() {
    let zero_size = TokenBucketConfig {
        size: 0,
        one_time_burst: Some(5),
        refill_time: 100,
    };
    let zero_time = TokenBucketConfig {
        size: 5,
        one_time_burst: None,
        refill_time: 0,
    };
    for mut limiter in [
        limiter(None, None),
        limiter(Some(zero_size), Some(zero_time)),
    ] {
        assert!(!limiter.limits_anything());
        assert_eq!(limiter.config(), RateLimiterConfig::default());
        for _ in 0..3 {
            assert!(limiter.consume(u64::MAX, TokenType::Bytes));
            assert!(limiter.consume(u64::MAX, TokenType::Ops));
            assert!(limiter.consume_request(u64::MAX));
        }
        assert_eq!(limiter.throttled_events(), 0);
    }
    assert!(!RateLimiterConfig::default().limits_anything());
    assert!(!RateLimiterConfig {
        bandwidth: Some(zero_size),
        ops: Some(zero_time)
    }
    .limits_anything());
}

#[test]
fn a_dry_bucket_arms_the_timer_and_the_timer_ends_the_throttle() {
    let mut limiter = limiter(None, Some(TokenBucketConfig::per_second(100, None)));
    assert!(limiter.limits_anything());
    // Bytes are not limited at all.
    assert!(limiter.consume(u64::MAX, TokenType::Bytes));
    assert!(limiter.consume(100, TokenType::Ops));
    assert!(!limiter.is_blocked());
    // 200 ms short.
    assert!(!limiter.consume(20, TokenType::Ops));
    assert!(limiter.is_blocked());
    assert_eq!(limiter.throttled_events(), 1);
    // Blocked: everything waits, without counting again, until the timer fires.
    assert!(!limiter.consume(1, TokenType::Ops));
    assert!(!limiter.consume(0, TokenType::Bytes));
    assert_eq!(limiter.throttled_events(), 1);
    assert!(timer_fires(&limiter, Duration::from_secs(2)));
    assert!(limiter.on_timer());
    assert!(!limiter.is_blocked());
    assert!(limiter.consume(20, TokenType::Ops));
    // Nothing was pending: a second report of the timer finds nothing to retry.
    assert!(!limiter.on_timer());
    assert!(!timer_fires(&limiter, Duration::ZERO));
}

#[test]
fn a_request_takes_an_operation_and_its_bytes_or_neither() {
    let mut limiter = limiter(Some(per_hour(1000, None)), Some(per_hour(10, None)));
    assert!(limiter.consume_request(600));
    assert!(!limiter.consume_request(600));
    assert!(limiter.is_blocked());
    // The refused request's operation was given back: 9 are left.
    limiter.update(&RateLimiterConfig {
        bandwidth: Some(per_hour(1 << 30, None)),
        ops: None,
    });
    for _ in 0..9 {
        assert!(limiter.consume_request(600));
    }
    assert!(!limiter.consume_request(600));
    assert_eq!(limiter.throttled_events(), 2);
}

#[test]
fn reconfiguring_replaces_given_buckets_and_keeps_the_rest() {
    let bw = per_hour(1000, Some(500));
    let ops = per_hour(10, None);
    let mut limiter = limiter(Some(bw), Some(ops));
    assert!(limiter.consume(1500, TokenType::Bytes));
    assert!(limiter.consume(4, TokenType::Ops));
    assert!(!limiter.consume(1, TokenType::Bytes));
    assert!(limiter.is_blocked());

    // Only the ops bucket given: it starts full; the bandwidth bucket keeps its state,
    // and the throttle ends (its next use finds it still dry).
    let faster_ops = per_hour(20, None);
    limiter.update(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(faster_ops),
    });
    assert!(!limiter.is_blocked());
    assert_eq!(limiter.config().bandwidth, Some(bw));
    assert_eq!(limiter.config().ops, Some(faster_ops));
    assert!(limiter.consume(20, TokenType::Ops));
    assert!(!limiter.consume(1, TokenType::Bytes));
    assert!(limiter.is_blocked());

    // A bucket of size 0 removes one; the other stays.
    limiter.update(&RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::default()),
        ops: None,
    });
    assert_eq!(limiter.config().bandwidth, None);
    assert!(limiter.consume(u64::MAX, TokenType::Bytes));
    assert!(!limiter.consume(1, TokenType::Ops));
    limiter.update(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig::default()),
    });
    assert!(!limiter.limits_anything());
    assert_eq!(limiter.config(), RateLimiterConfig::default());
    assert!(limiter.consume_request(u64::MAX));
    // The timer that was armed is off: nothing fires later.
    assert!(!timer_fires(&limiter, ms(20)));
}

#[test]
fn configuration_updates_follow_firecracker() {
    let a = TokenBucketConfig::per_second(1, None);
    let b = TokenBucketConfig::per_second(2, Some(3));
    let old = RateLimiterConfig {
        bandwidth: Some(a),
        ops: Some(a),
    };
    let update = RateLimiterConfig {
        bandwidth: Some(b),
        ops: None,
    };
    assert_eq!(
        old.updated(&update),
        RateLimiterConfig {
            bandwidth: Some(b),
            ops: Some(a)
        }
    );
    let remove = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 1000,
        }),
    };
    assert_eq!(
        old.updated(&remove),
        RateLimiterConfig {
            bandwidth: Some(a),
            ops: None
        }
    );
    assert_eq!(old.updated(&RateLimiterConfig::default()), old);

    // Firecracker's JSON.
    let parsed: RateLimiterConfig = serde_json::from_str(
        r#"{"bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 1000},
            "ops": {"size": 100, "refill_time": 500}}"#,
    )
    .unwrap();
    assert_eq!(parsed.bandwidth.unwrap().one_time_burst, Some(4096));
    assert_eq!(parsed.ops.unwrap().refill_time, 500);
    assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw": {}}"#).is_err());
    // firecracker-rs-sdk 0.1's spelling, with its nulls.
    let sdk: RateLimiterConfig = serde_json::from_str(
        r#"{"banwidth": {"one_time_burst": null, "refill_time": 10, "size": 5}, "ops": null}"#,
    )
    .unwrap();
    assert_eq!(sdk.bandwidth.unwrap().size, 5);
    assert!(
        serde_json::from_str::<RateLimiterConfig>(r#"{"ops": {"size": 1}}"#).is_err(),
        "refill_time is required"
    );
}

#[test]
fn json_leaves_absent_options_out_and_postcard_keeps_every_field() {
    let config = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::per_second(10, None)),
        ops: None,
    };
    assert_eq!(
        serde_json::to_string(&config).unwrap(),
        r#"{"bandwidth":{"size":10,"refill_time":1000}}"#
    );
    assert_eq!(
        serde_json::to_string(&RateLimiterConfig::default()).unwrap(),
        "{}"
    );
    for config in [
        config,
        RateLimiterConfig::default(),
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::per_second(u64::MAX, Some(7))),
        },
    ] {
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<RateLimiterConfig>(&json).unwrap(),
            config
        );
        let bytes = postcard::to_stdvec(&config).unwrap();
        assert_eq!(
            postcard::from_bytes::<RateLimiterConfig>(&bytes).unwrap(),
            config
        );
    }
}
