use super::*;
use crate::devices::virtio::net::NetBackend;

fn temp_file(name: &str, len: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hearth-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let file = File::create(&path).unwrap();
    file.set_len(len).unwrap();
    path
}

/// A valid configuration on any host: a readable kernel, 128 MiB, the host profile.
fn config(kernel: &Path) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.mem_size = 128 << 20;
    config.cpu_profile = CpuProfileChoice::Host;
    config
}

#[test]
fn memory_sizes() {
    assert_eq!(parse_memory_size("256M").unwrap(), 256 << 20);
    assert_eq!(parse_memory_size("1G").unwrap(), 1 << 30);
    assert_eq!(parse_memory_size("4096k").unwrap(), 4 << 20);
    assert_eq!(parse_memory_size("8388608").unwrap(), 8 << 20);
    for bad in [
        "0",
        "12Q",
        "",
        "M",
        "1M",
        "99999999999999999999G",
        "4097K",
        "1024T",
    ] {
        assert!(parse_memory_size(bad).is_err(), "{bad} should be rejected");
    }
    let msg = parse_memory_size("12Q").unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid memory size \"12Q\": unknown size suffix \"Q\""
    );
}

#[test]
fn memory_sizes_format_as_they_parse() {
    for (bytes, text) in [
        (1u64 << 40, "1T"),
        (3 << 30, "3G"),
        (256 << 20, "256M"),
        (1536 << 20, "1536M"),
        (4100 << 10, "4100K"),
        (0, "0"),
        (1000, "1000"),
    ] {
        assert_eq!(format_memory_size(bytes), text);
    }
    for bytes in [MIN_MEMORY, 129 << 20, (64 << 20) + 4096, 5 << 30] {
        assert_eq!(
            parse_memory_size(&format_memory_size(bytes)).unwrap(),
            bytes
        );
    }
}

#[test]
fn cmdline_split() {
    assert_eq!(
        split_cmdline("console=ttyS0 -- uname -a"),
        ("console=ttyS0".to_string(), Some("uname -a".to_string()))
    );
    assert_eq!(
        split_cmdline("console=ttyS0 panic=1"),
        ("console=ttyS0 panic=1".to_string(), None)
    );
    assert_eq!(split_cmdline("a --"), ("a".to_string(), None));
    assert_eq!(
        split_cmdline("a --x -- b -- c"),
        ("a --x".to_string(), Some("b -- c".to_string()))
    );
    // The kernel does not stop at a `--` inside quotes, so neither does hearth.
    assert_eq!(
        split_cmdline(r#"a x="1 -- 2" -- init"#),
        (r#"a x="1 -- 2""#.to_string(), Some("init".to_string()))
    );
}

#[test]
fn defaults_are_those_of_hearth_run() {
    let config = VmConfig::new("/k");
    assert_eq!(config.vcpu_count, 1);
    assert_eq!(config.mem_size, DEFAULT_MEM_SIZE);
    assert_eq!(config.boot_args, DEFAULT_CMDLINE);
    assert_eq!(config.serial, SerialConfig::Stdio);
    assert_eq!(config.cpu_profile, CpuProfileChoice::Auto);
}

#[test]
fn a_valid_config_passes() {
    let kernel = temp_file("kernel-ok", 4096);
    let config = config(&kernel);
    config.validate().unwrap();
    assert_eq!(config.resolved_cpu_profile(), CpuProfile::Host);
    let cmdline = config.kernel_cmdline().unwrap();
    assert_eq!(
        cmdline.as_cstring().unwrap().to_str().unwrap(),
        DEFAULT_CMDLINE
    );
}

#[test]
fn compat_profile_extends_the_cmdline_before_init_args() {
    let kernel = temp_file("kernel-compat", 4096);
    let mut config = config(&kernel);
    config.cpu_profile = CpuProfileChoice::Compat;
    config.boot_args = "console=ttyS0".into();
    config.init_args = Some("uname -a".into());
    config.validate().unwrap();
    let line = config.kernel_cmdline().unwrap().as_cstring().unwrap();
    let line = line.to_str().unwrap();
    assert!(line.starts_with("console=ttyS0 "), "{line}");
    assert!(line.contains(pvm::GUEST_CMDLINE), "{line}");
    assert!(line.ends_with(" -- uname -a"), "{line}");
}

#[test]
fn auto_profile_follows_the_host() {
    let expected = if pvm::host_is_pvm() {
        CpuProfile::Compat
    } else {
        CpuProfile::Host
    };
    assert_eq!(CpuProfileChoice::Auto.resolve(), expected);
    assert_eq!(CpuProfileChoice::Host.resolve(), CpuProfile::Host);
    assert_eq!(CpuProfileChoice::Compat.resolve(), CpuProfile::Compat);
}

/// The error `validate` gives for `config` changed by `change`.
fn rejected(kernel: &Path, change: impl FnOnce(&mut VmConfig)) -> ConfigError {
    let mut config = config(kernel);
    change(&mut config);
    config.validate().unwrap_err()
}

#[test]
fn bad_configs_are_rejected() {
    let kernel = temp_file("kernel-bad", 4096);
    let image = temp_file("disk.img", 1 << 20);
    assert!(matches!(
        rejected(&kernel, |c| c.vcpu_count = 0),
        ConfigError::VcpuCount(0)
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.vcpu_count = 255),
        ConfigError::VcpuCount(255)
    ));
    for size in [0, MIN_MEMORY - PAGE_SIZE, (64 << 20) + 1, MAX_MEMORY * 2] {
        assert!(
            matches!(
                rejected(&kernel, |c| c.mem_size = size),
                ConfigError::MemorySize { .. }
            ),
            "{size}"
        );
    }
    assert!(matches!(
        rejected(&kernel, |c| c.mem_size = MAX_MEMORY),
        ConfigError::MemoryAboveHost { .. }
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.boot_args = "x".repeat(5000)),
        ConfigError::CmdlineTooLong { len: 5000, .. }
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.boot_args = "a -- b".into()),
        ConfigError::InitArgsInBootArgs(_)
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.boot_args = r#"a "--" b"#.into()),
        ConfigError::InitArgsInBootArgs(_)
    ));
    let err = rejected(&kernel, |c| c.kernel = "/nonexistent/vmlinux".into());
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    assert!(matches!(
        rejected(&kernel, |c| c.kernel = std::env::temp_dir()),
        ConfigError::NotAFile { .. }
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.initrd =
            Some(temp_file("initrd-big", 200 << 20))),
        ConfigError::InitrdTooLarge { .. }
    ));
    assert!(matches!(
        rejected(&kernel, |c| c.serial = SerialConfig::File(PathBuf::new())),
        ConfigError::EmptyPath("serial console")
    ));

    let disk = |id: Option<&str>, path: &Path| BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        id: id.map(str::to_string),
        rate_limiter: Default::default(),
    };
    let err = rejected(&kernel, |c| {
        c.disks = vec![disk(Some("abcdefghijklmnopqrstuvwxyz"), &image)]
    });
    assert!(
        matches!(err, ConfigError::DiskIdTooLong { len: 26, .. }),
        "{err}"
    );
    let err = rejected(&kernel, |c| {
        c.disks = vec![disk(None, Path::new("/nonexistent/disk.img"))]
    });
    assert_eq!(
        crate::error_chain(&err),
        "cannot read disk image \"/nonexistent/disk.img\": No such file or directory (os error 2)"
    );

    let nic = |tap: &str, mac| NetConfig {
        mac,
        ..NetConfig::new(NetBackend::Tap(tap.to_string()))
    };
    for tap in ["", "a/b", "sixteen-bytes-xx", "with space"] {
        assert!(
            matches!(
                rejected(&kernel, |c| c.nets = vec![nic(tap, None)]),
                ConfigError::TapName(_)
            ),
            "{tap:?}"
        );
    }
    let err = rejected(&kernel, |c| {
        c.nets = vec![nic("tap0", Some([1, 0, 0x5e, 0, 0, 1]))]
    });
    assert_eq!(
        err.to_string(),
        "tap \"tap0\": MAC address 01:00:5e:00:00:01 is multicast; a NIC needs a unicast address"
    );

    let vsock = |guest_cid, path: &str| VsockConfig {
        guest_cid,
        uds_path: path.into(),
    };
    for cid in [0, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            rejected(&kernel, |c| c.vsock = Some(vsock(cid, "/v.sock"))),
            ConfigError::VsockCid(_)
        ));
    }
    assert!(matches!(
        rejected(&kernel, |c| c.vsock = Some(vsock(3, ""))),
        ConfigError::EmptyPath("vsock socket")
    ));
}

#[test]
fn devices_that_pass() {
    let kernel = temp_file("kernel-devices", 4096);
    let image = temp_file("disk-ok.img", 1 << 20);
    let mut config = config(&kernel);
    config.disks.push(BlockConfig {
        path: image,
        read_only: true,
        id: Some("x".repeat(block::ID_BYTES)),
        rate_limiter: Default::default(),
    });
    config.nets.push(NetConfig {
        backend: NetBackend::Tap("tap0".into()),
        mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        rx_rate_limiter: Default::default(),
        tx_rate_limiter: Default::default(),
    });
    config.vsock = Some(VsockConfig {
        guest_cid: u64::from(u32::MAX) - 1,
        uds_path: "/run/v.sock".into(),
    });
    config.rng = Some(RngConfig::default());
    config.validate().unwrap();
}

/// `"rng": {}` turns the entropy device on, `null` or no key leaves it out, a rate
/// limiter is Firecracker's object, and options it does not have are refused.
#[test]
fn the_entropy_device_in_json() {
    let kernel = temp_file("kernel-rng", 4096);
    let json = |rng: &str| {
        format!(
            r#"{{"kernel": "{}", "mem_size": "128M", "cpu_profile": "host"{rng}}}"#,
            kernel.display()
        )
    };
    let config: VmConfig = serde_json::from_str(&json(r#", "rng": {}"#)).unwrap();
    assert_eq!(config.rng, Some(RngConfig::default()));
    config.validate().unwrap();
    for off in ["", r#", "rng": null"#] {
        let config: VmConfig = serde_json::from_str(&json(off)).unwrap();
        assert_eq!(config.rng, None, "{off}");
        config.validate().unwrap();
    }
    let limited: VmConfig = serde_json::from_str(&json(
        r#", "rng": {"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}}}"#,
    ))
    .unwrap();
    let bucket = limited.rng.unwrap().rate_limiter.bandwidth.unwrap();
    assert_eq!((bucket.size, bucket.refill_time), (100, 10));
    for bad in [
        r#", "rng": {"rate_limiter": {"bytes": {}}}"#,
        r#", "rng": {"rate": 1}"#,
        r#", "rng": true"#,
        r#", "entropy": {}"#,
    ] {
        assert!(
            serde_json::from_str::<VmConfig>(&json(bad)).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn json_fills_in_the_defaults() {
    let config: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
    assert_eq!(config, VmConfig::new("/k"));
}

#[test]
fn json_round_trips() {
    let mut config = VmConfig::new("/boot/vmlinux");
    config.initrd = Some("/boot/initrd,1.cpio".into());
    config.init_args = Some("sh -c 'exit 3'".into());
    config.vcpu_count = 2;
    config.mem_size = 512 << 20;
    config.serial = SerialConfig::Unix("/run/console.sock".into());
    config.disks.push(BlockConfig {
        path: "/img.ext4".into(),
        read_only: true,
        id: Some("root".into()),
        rate_limiter: Default::default(),
    });
    config.nets.push(NetConfig {
        backend: NetBackend::Tap("tap0".into()),
        mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        rx_rate_limiter: Default::default(),
        tx_rate_limiter: Default::default(),
    });
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: "/run/v.sock".into(),
    });
    config.rng = Some(RngConfig::default());
    config.boot_timer = true;
    config.cpu_profile = CpuProfileChoice::Compat;
    let json = config.to_json().unwrap();
    assert!(json.contains(r#""mac": "52:54:00:12:34:56""#), "{json}");
    assert!(json.contains(r#""unix": "/run/console.sock""#), "{json}");
    assert!(json.contains(r#""cpu_profile": "compat""#), "{json}");
    assert!(json.contains(r#""rng": {"#), "{json}");
    let back: VmConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
}

#[test]
fn rip_sampling_is_optional_in_json_and_checked() {
    let kernel = temp_file("kernel-sampling", 4096);
    let mut config = config(&kernel);
    // Off: the key is left out, so configs written before it read back the same.
    assert!(!config.to_json().unwrap().contains("sample_rip"));
    let json = r#"{"kernel": "/k", "sample_rip": {"interval_ms": 5, "kernel_symbols": "/m"}}"#;
    let parsed: VmConfig = serde_json::from_str(json).unwrap();
    let sampling = parsed.sample_rip.unwrap();
    assert_eq!(sampling.interval_ms, 5);
    assert_eq!(sampling.kernel_symbols, Some(PathBuf::from("/m")));
    assert!(serde_json::from_str::<VmConfig>(
        r#"{"kernel": "/k", "sample_rip": {"interval_ms": 5, "every": 1}}"#
    )
    .is_err());

    for (interval_ms, ok) in [(0, false), (1, true), (MAX_SAMPLE_INTERVAL_MS + 1, false)] {
        config.sample_rip = Some(RipSamplingConfig {
            interval_ms,
            kernel_symbols: None,
        });
        assert_eq!(config.validate().is_ok(), ok, "{interval_ms} ms");
    }
    config.sample_rip = Some(RipSamplingConfig {
        interval_ms: 5,
        kernel_symbols: Some(kernel.with_file_name("no-such-System.map")),
    });
    let err = config.validate().unwrap_err().to_string();
    assert!(err.starts_with("cannot read kernel symbols"), "{err}");
}

#[test]
fn json_memory_takes_bytes_or_a_size() {
    let parse = |mem: &str| {
        serde_json::from_str::<VmConfig>(&format!(r#"{{"kernel": "/k", "mem_size": {mem}}}"#))
    };
    assert_eq!(parse("134217728").unwrap().mem_size, 128 << 20);
    assert_eq!(parse(r#""128M""#).unwrap().mem_size, 128 << 20);
    let err = parse(r#""12Q""#).unwrap_err().to_string();
    assert!(err.contains("invalid memory size \"12Q\""), "{err}");
    assert!(parse("-1").is_err());
    assert!(parse("1.5").is_err());
}

#[test]
fn json_refuses_unknown_fields_at_every_level() {
    for bad in [
        r#"{"kernel": "/k", "memory": "1G"}"#,
        r#"{"kernel": "/k", "disks": [{"path": "/d", "readonly": true}]}"#,
        r#"{"kernel": "/k", "nets": [{"tap": "t", "queues": 2}]}"#,
        r#"{"kernel": "/k", "vsock": {"guest_cid": 3, "uds_path": "/v", "port": 1}}"#,
        r#"{"kernel": "/k", "serial": {"tcp": "1"}}"#,
        r#"{"kernel": "/k", "serial": "pty"}"#,
        r#"{"kernel": "/k", "cpu_profile": "fast"}"#,
        r#"{"kernel": "/k", "boot_speedups": true}"#,
        r#"{"initrd": "/i"}"#,
    ] {
        assert!(serde_json::from_str::<VmConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn config_files_name_themselves_in_errors() {
    let path = temp_file("bad.json", 0);
    std::fs::write(&path, r#"{"kernel": "/k", "cpus": 2}"#).unwrap();
    let err = VmConfig::from_file(&path).unwrap_err();
    let text = crate::error_chain(&err);
    assert!(
        text.starts_with(&format!(
            "invalid config file \"{}\": unknown field `cpus`",
            path.display()
        )),
        "{text}"
    );
    let err = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
}

/// `"balloon"` in hearth's config file: Firecracker's fields, reporting on unless turned
/// off, a target that must fit in the guest.
#[test]
fn the_balloon_in_json() {
    let kernel = temp_file("kernel-balloon", 4096);
    let json = |balloon: &str| {
        format!(
            r#"{{"kernel": "{}", "mem_size": "128M", "cpu_profile": "host"{balloon}}}"#,
            kernel.display()
        )
    };
    let config: VmConfig =
        serde_json::from_str(&json(r#", "balloon": {"amount_mib": 16}"#)).unwrap();
    let balloon = config.balloon.clone().unwrap();
    assert_eq!(balloon.amount_mib, 16);
    assert!(balloon.free_page_reporting);
    config.validate().unwrap();
    let back: VmConfig = serde_json::from_str(&config.to_json().unwrap()).unwrap();
    assert_eq!(back.balloon, config.balloon);
    let config: VmConfig = serde_json::from_str(&json("")).unwrap();
    assert_eq!(config.balloon, None);
    let too_big: VmConfig =
        serde_json::from_str(&json(r#", "balloon": {"amount_mib": 129}"#)).unwrap();
    let err = too_big.validate().unwrap_err().to_string();
    assert!(
        err.contains("larger than the guest's memory (128 MiB)"),
        "{err}"
    );
    assert!(serde_json::from_str::<VmConfig>(&json(r#", "balloon": {"size": 1}"#)).is_err());
}

/// The compat profile's command line for `boot_args` (and `init_args`) with `speedups`.
fn compat_line(boot_args: &str, init_args: Option<&str>, speedups: BootSpeedups) -> String {
    let kernel = temp_file("kernel-speedups", 4096);
    let mut config = config(&kernel);
    config.cpu_profile = CpuProfileChoice::Compat;
    config.boot_args = boot_args.into();
    config.init_args = init_args.map(str::to_string);
    config.boot_speedups = speedups;
    config.validate().unwrap();
    let line = config.kernel_cmdline().unwrap().as_cstring().unwrap();
    line.into_string().unwrap()
}

fn speedup(name: &str) -> &'static str {
    pvm::BOOT_SPEEDUPS
        .iter()
        .find(|s| s.name() == name)
        .unwrap()
        .param
}

#[test]
fn speedups_follow_the_users_line_and_the_compat_options_before_init_args() {
    let line = compat_line(
        "console=ttyS0 quiet",
        Some("/bin/sh -c true"),
        BootSpeedups::On,
    );
    let all: Vec<&str> = pvm::BOOT_SPEEDUPS.iter().map(|s| s.param).collect();
    assert_eq!(
        line,
        format!(
            "console=ttyS0 quiet {} {} -- /bin/sh -c true",
            pvm::GUEST_CMDLINE,
            all.join(" ")
        )
    );
    // Init's words are not the kernel's: a speed-up's name there does not count.
    let line = compat_line("console=ttyS0", Some("nowatchdog tsc=x"), BootSpeedups::On);
    let (kernel_part, init_part) = line.split_once(" -- ").unwrap();
    assert!(kernel_part.ends_with(&all.join(" ")), "{line}");
    assert_eq!(init_part, "nowatchdog tsc=x");
}

#[test]
fn speedups_never_override_what_the_user_set() {
    // A value, a bare flag, a value given to a flag, dashes for underscores, quotes.
    for (user, left_out) in [
        ("tsc=unstable", "tsc"),
        ("tsc", "tsc"),
        ("nowatchdog", "nowatchdog"),
        ("nowatchdog=0", "nowatchdog"),
        ("no-timer-check", "no_timer_check"),
        ("cryptomgr.notests=0", "cryptomgr.notests"),
        (r#""tsc=unstable""#, "tsc"),
        ("nmi_watchdog=1", "nowatchdog"),
        ("watchdog_thresh=30", "nowatchdog"),
    ] {
        let line = compat_line(&format!("console=ttyS0 {user}"), None, BootSpeedups::On);
        let appended = line
            .strip_prefix(&format!("console=ttyS0 {user} "))
            .unwrap();
        assert!(!appended.contains(speedup(left_out)), "{user}: {line}");
        let others = pvm::BOOT_SPEEDUPS.iter().filter(|s| s.name() != left_out);
        for other in others {
            assert!(appended.contains(other.param), "{user}: {line}");
        }
    }
    // A name inside another parameter's quoted value is not set.
    let line = compat_line(r#"dyndbg="tsc=unstable""#, None, BootSpeedups::On);
    assert!(line.contains(speedup("tsc")), "{line}");
}

#[test]
fn the_initcall_blacklist_adds_to_the_users() {
    // The kernel blacklists what every occurrence names, so hearth's adds to the user's.
    let user = "initcall_blacklist=cubictcp_register";
    let line = compat_line(&format!("console=ttyS0 {user}"), None, BootSpeedups::On);
    assert!(
        line.starts_with(&format!("console=ttyS0 {user} ")),
        "{line}"
    );
    assert!(line.ends_with(speedup("initcall_blacklist")), "{line}");
}

#[test]
fn the_off_switch_keeps_only_what_the_guest_must_not_use() {
    let line = compat_line("console=ttyS0", Some("init"), BootSpeedups::Off);
    assert_eq!(
        line,
        format!("console=ttyS0 {} -- init", pvm::GUEST_CMDLINE)
    );
    assert_eq!(
        compat_boot_args("anything", BootSpeedups::Off),
        pvm::GUEST_CMDLINE
    );
}

#[test]
fn the_host_profile_appends_nothing() {
    let kernel = temp_file("kernel-host-speedups", 4096);
    let mut config = config(&kernel);
    config.boot_args = "console=ttyS0".into();
    config.init_args = Some("init".into());
    assert_eq!(config.boot_speedups, BootSpeedups::On);
    let line = config.kernel_cmdline().unwrap().as_cstring().unwrap();
    assert_eq!(line.to_str().unwrap(), "console=ttyS0 -- init");
}

#[test]
fn a_line_too_long_with_the_speedups_says_how_to_shorten_it() {
    let kernel = temp_file("kernel-long-speedups", 4096);
    let mut config = config(&kernel);
    config.cpu_profile = CpuProfileChoice::Compat;
    // Fits with what the guest must not use, not with the speed-ups as well.
    config.boot_args = "x".repeat(layout::CMDLINE_MAX_SIZE - 2 - pvm::GUEST_CMDLINE.len());
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("--boot-speedups off"), "{err}");
    config.boot_speedups = BootSpeedups::Off;
    config.validate().unwrap();
}

#[test]
fn json_boot_speedups_default_on() {
    let parse = |extra: &str| {
        serde_json::from_str::<VmConfig>(&format!(r#"{{"kernel": "/k"{extra}}}"#)).unwrap()
    };
    assert_eq!(parse("").boot_speedups, BootSpeedups::On);
    assert_eq!(
        parse(r#", "boot_speedups": "off""#).boot_speedups,
        BootSpeedups::Off
    );
    let mut config = VmConfig::new("/k");
    config.boot_speedups = BootSpeedups::Off;
    let json = config.to_json().unwrap();
    assert!(json.contains(r#""boot_speedups": "off""#), "{json}");
}

/// x86 reads only the last `clearcpuid=`, so the compat profile's list carries the user's
/// features too instead of replacing them.
#[test]
fn the_users_clearcpuid_is_merged_into_the_compat_one() {
    let line = compat_line(
        "console=ttyS0 clearcpuid=arch_capabilities,smap",
        None,
        BootSpeedups::Off,
    );
    let last = line
        .split(' ')
        .rfind(|w| w.starts_with("clearcpuid="))
        .unwrap();
    let features: Vec<&str> = last["clearcpuid=".len()..].split(',').collect();
    assert_eq!(&features[..2], ["arch_capabilities", "smap"], "{line}");
    for ours in ["cx16", "popcnt", "sse4_2"] {
        assert!(features.contains(&ours), "{line}");
    }
    assert_eq!(
        features.iter().filter(|f| **f == "smap").count(),
        1,
        "{line}"
    );
    // Without one of the user's, the compat options are appended as they are.
    let plain = compat_line("console=ttyS0", None, BootSpeedups::Off);
    assert!(plain.contains(pvm::GUEST_CMDLINE), "{plain}");
}

#[test]
fn a_merged_clearcpuid_the_kernel_would_cut_short_is_refused() {
    let kernel = temp_file("kernel-clearcpuid", 4096);
    let mut config = config(&kernel);
    config.cpu_profile = CpuProfileChoice::Compat;
    config.boot_args = format!("clearcpuid={}", ["avx512f"; 10].join(","));
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("longer than the 127 bytes Linux reads"),
        "{err}"
    );
    config.cpu_profile = CpuProfileChoice::Host;
    config.validate().unwrap();
}

/// Without a user's list, hearth's own `clearcpuid=` goes in as it is: Linux must read it
/// whole.
#[test]
fn the_compat_clearcpuid_alone_fits_what_linux_reads() {
    let ours = pvm::GUEST_CMDLINE
        .split(' ')
        .find_map(|word| word.strip_prefix(CLEARCPUID))
        .unwrap();
    assert!(ours.len() < CLEARCPUID_MAX, "{ours}");
}
