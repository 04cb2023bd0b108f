//! Boot parameters that spare any Linux guest minutes of emulated work on a nested-PVM host
//! and cost it nothing it needs to run. The compat profile appends them after the user's
//! command line unless the user already decided the same thing (see `config::kernel_cmdline`)
//! or turned them off (`--boot-speedups off`).
//!
//! What is left out on purpose, because it trades security or behaviour for time and only
//! the user can make that trade (the README's "Nested PVM hosts" lists each with its cost):
//! `mitigations=off`, `nokaslr`, `init_on_alloc=0`, and `initcall_blacklist=cubictcp_register`
//! (it changes the default TCP congestion control to reno). `lpj=` is left out as well:
//! x86 derives loops-per-jiffy from the TSC frequency (`lpj_fine` in `tsc_init`, and APs with
//! a constant TSC copy it), so it saves nothing there, and a fixed value would be wrong for
//! any TSC frequency or `HZ` other than the one it was computed for, scaling every `udelay`.

/// One boot parameter and why it is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSpeedup {
    /// The parameter as appended: `name` or `name=value`.
    pub param: &'static str,
    /// Why it saves time under emulation.
    pub why: &'static str,
    /// What the guest gives up with it.
    pub cost: &'static str,
    /// Other parameter names with which the user already chose about the same thing; any
    /// of them on the user's command line leaves this one out.
    pub decided_by: &'static [&'static str],
    /// The kernel adds every occurrence of this parameter to one list, so appending it
    /// extends the user's list instead of overriding it: appended even when the user set
    /// the same name.
    pub accumulates: bool,
}

impl BootSpeedup {
    /// The parameter's name: the text before `=`, or the whole flag.
    pub fn name(&self) -> &'static str {
        self.param
            .split_once('=')
            .map_or(self.param, |(name, _)| name)
    }
}

/// The initcalls [`BOOT_SPEEDUPS`] blacklists. The kernel skips a name no initcall has, so
/// the list is harmless for kernels built without ftrace or BPF, or older than a name.
pub const BLACKLISTED_INITCALLS: &[&str] = &[
    "ftrace_check_for_weak_functions",
    "trace_eval_init",
    "tracer_init_tracefs",
    "kfunc_init",
    "bpf_key_sig_kfuncs_init",
    "bpf_rstat_kfunc_init",
    "bpf_prog_test_run_init",
    "bpf_tcp_ca_kfunc_init",
];

/// The speed-ups, in the order they are appended.
pub const BOOT_SPEEDUPS: &[BootSpeedup] = &[
    BootSpeedup {
        param: "tsc=reliable",
        why: "the clocksource watchdog reads its reference timer through the emulator, \
              sees the TSC drift and drops it for a slow clocksource",
        cost: "a TSC that really drifts is not detected (KVM gives every vCPU the host's \
               stable TSC)",
        decided_by: &[],
        accumulates: false,
    },
    BootSpeedup {
        param: "no_timer_check",
        why: "the boot check that the IOAPIC timer interrupt arrives waits for ticks under \
              emulation and may wrongly reroute the timer",
        cost: "a broken timer interrupt route is not worked around (hearth's routing is \
               fixed)",
        decided_by: &[],
        accumulates: false,
    },
    BootSpeedup {
        param: "nowatchdog",
        why: "the soft and hard lockup detectors fire falsely when kernel code runs \
              thousands of times slower",
        cost: "a real lockup in the guest is not reported",
        decided_by: &[
            "nmi_watchdog",
            "nosoftlockup",
            "watchdog_thresh",
            "softlockup_panic",
        ],
        accumulates: false,
    },
    BootSpeedup {
        param: "cryptomgr.notests",
        why: "the crypto self-tests run minutes of emulated code at boot",
        cost: "a broken crypto implementation is not caught when it registers (ignored in \
               FIPS mode, which keeps its tests)",
        decided_by: &[],
        accumulates: false,
    },
    BootSpeedup {
        param: "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,\
                tracer_init_tracefs,kfunc_init,bpf_key_sig_kfuncs_init,bpf_rstat_kfunc_init,\
                bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init",
        why: "ftrace and BPF set-up runs minutes of emulated code (trace_eval_init's event \
              format update alone about 12 minutes)",
        cost: "no tracefs (/sys/kernel/tracing stays empty: no ftrace, trace-cmd or perf \
               tracepoints), event formats keep enum names, stale ftrace records of \
               overridden weak functions stay enabled, and BPF programs that call the \
               kfuncs these register fail to load",
        decided_by: &[],
        accumulates: true,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blacklist_parameter_lists_exactly_the_blacklisted_initcalls() {
        let blacklist = BOOT_SPEEDUPS
            .iter()
            .find(|s| s.name() == "initcall_blacklist")
            .unwrap();
        assert_eq!(
            blacklist.param,
            format!("initcall_blacklist={}", BLACKLISTED_INITCALLS.join(","))
        );
    }

    #[test]
    fn parameters_are_single_words_with_distinct_names() {
        let mut names = Vec::new();
        for speedup in BOOT_SPEEDUPS {
            assert!(
                !speedup.param.is_empty() && !speedup.param.contains([' ', '"']),
                "{speedup:?}"
            );
            assert!(!speedup.why.is_empty() && !speedup.cost.is_empty());
            assert!(!names.contains(&speedup.name()), "{speedup:?}");
            names.push(speedup.name());
        }
        assert_eq!(BootSpeedup::name(&BOOT_SPEEDUPS[0]), "tsc");
    }

    /// The trades only the user may make stay out of the list.
    #[test]
    fn nothing_security_relevant_or_behaviour_changing() {
        for left_out in [
            "mitigations",
            "nokaslr",
            "init_on_alloc",
            "init_on_free",
            "lpj",
            "nopti",
            "spectre_v2",
        ] {
            assert!(
                BOOT_SPEEDUPS.iter().all(|s| s.name() != left_out),
                "{left_out}"
            );
        }
        assert!(!BLACKLISTED_INITCALLS.contains(&"cubictcp_register"));
    }
}
