//! Where a vCPU spends its time: a statistical RIP sampler (`--sample-rip MS`).
//!
//! KVM answers register ioctls only between KVM_RUNs of the vCPU's own thread, so the
//! samples are taken there: the VMM kicks every vCPU out of KVM_RUN at the sampling
//! interval, and after such an interrupted run the thread reads RIP, the privilege level
//! and the run state. Only kicks are sampled, not the exits the guest causes itself: a
//! kick lands at a moment unrelated to what the guest does, so the samples measure time,
//! where sampling at exits would favour code that exits often.
//!
//! Every [`REPORT_INTERVAL`] (and when the vCPU stops) the thread logs, at info, the most
//! sampled functions since the last report; at debug, every sample as it is taken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::symbols::Symbols;

/// How often each vCPU reports its samples.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Functions listed per report.
const TOP_FUNCTIONS: usize = 15;
/// A window whose running samples all fell in at most this many places...
const STUCK_PLACES: usize = 3;
/// ...with at least this many samples, gets a warning: the vCPU may be spinning.
const STUCK_MIN_SAMPLES: u32 = 20;

/// What one sample saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub rip: u64,
    /// The current privilege level (3: user mode).
    pub cpl: u8,
    pub state: RunState,
}

/// The vCPU's run state at the sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Waiting in HLT for an interrupt: idle, not busy.
    Halted,
    /// An application processor still waiting for INIT/SIPI.
    NotStarted,
}

/// What a sample counts towards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Place {
    Symbol(usize),
    /// A kernel-mode address no symbol covers (or no symbols at all).
    Raw(u64),
    User,
    NotStarted,
}

/// Samples since the last report.
#[derive(Debug)]
struct Window {
    started: Instant,
    counts: HashMap<Place, u32>,
    samples: u32,
    user: u32,
    halted: u32,
}

impl Window {
    fn new(started: Instant) -> Self {
        Self {
            started,
            counts: HashMap::new(),
            samples: 0,
            user: 0,
            halted: 0,
        }
    }
}

/// One report: the window's totals and its places, most sampled first.
#[derive(Debug, PartialEq)]
pub struct Report {
    pub elapsed: Duration,
    pub samples: u32,
    pub user: u32,
    pub halted: u32,
    /// (place, samples), most first, at most [`TOP_FUNCTIONS`].
    pub top: Vec<(String, u32)>,
    /// When every running sample fell in a few places: those places.
    pub stuck_in: Option<Vec<String>>,
}

fn percent(part: u32, whole: u32) -> f64 {
    f64::from(part) * 100.0 / f64::from(whole.max(1))
}

impl Report {
    /// The lines this report is logged as, at info, then the warning if any.
    pub fn lines(&self, vcpu: u8) -> (Vec<String>, Option<String>) {
        let mut lines = vec![format!(
            "vCPU {vcpu}: {} RIP samples in {:.1} s, {:.1}% user mode, {:.1}% halted; top:",
            self.samples,
            self.elapsed.as_secs_f64(),
            percent(self.user, self.samples),
            percent(self.halted, self.samples),
        )];
        for (place, count) in &self.top {
            lines.push(format!(
                "vCPU {vcpu}: {:5.1}% {count:>6} {place}",
                percent(*count, self.samples)
            ));
        }
        let warning = self.stuck_in.as_ref().map(|places| {
            format!(
                "vCPU {vcpu}: all {} running samples of the last {:.1} s were in {} \
                 (a loop that does not progress?)",
                self.samples - self.halted,
                self.elapsed.as_secs_f64(),
                places.join(", ")
            )
        });
        (lines, warning)
    }
}

/// One vCPU's sampler, run by its thread.
#[derive(Debug)]
pub struct RipSampler {
    vcpu: u8,
    interval: Duration,
    symbols: Option<Arc<Symbols>>,
    last_sample: Option<Instant>,
    window: Window,
    /// A failed register read is reported once, not at every kick.
    read_failed: bool,
}

impl RipSampler {
    pub fn new(vcpu: u8, interval: Duration, symbols: Option<Arc<Symbols>>) -> Self {
        Self {
            vcpu,
            interval,
            symbols,
            last_sample: None,
            window: Window::new(Instant::now()),
            read_failed: false,
        }
    }

    /// After each KVM_RUN: samples when the run was interrupted (a kick) and a sample is
    /// due. A kick that comes early (a pause, the compat layer's own poll) is not one.
    pub fn after_run(&mut self, fd: &VcpuFd, interrupted: bool) {
        let now = Instant::now();
        // Three quarters of the interval: kicks arrive with some jitter and must not fall
        // just short and be skipped.
        let due = self
            .last_sample
            .is_none_or(|last| now.duration_since(last) >= self.interval * 3 / 4);
        if !interrupted || !due {
            return;
        }
        self.last_sample = Some(now);
        match read_sample(fd) {
            Ok(sample) => self.record(sample, now),
            Err(e) if !self.read_failed => {
                self.read_failed = true;
                log::warn!("vCPU {}: cannot sample its registers: {e}", self.vcpu);
            }
            Err(_) => {}
        }
    }

    /// Counts `sample`, and reports when the window is over.
    fn record(&mut self, sample: Sample, now: Instant) {
        let place = self.place(&sample);
        self.window.samples += 1;
        *self.window.counts.entry(place).or_default() += 1;
        match sample.state {
            RunState::Halted => self.window.halted += 1,
            RunState::Running | RunState::NotStarted => {}
        }
        if place == Place::User {
            self.window.user += 1;
        }
        if log::log_enabled!(log::Level::Debug) {
            let state = match (sample.state, place) {
                (RunState::Halted, _) => " (halted)",
                (RunState::NotStarted, _) => " (waiting for INIT/SIPI)",
                (RunState::Running, Place::User) => " (user mode)",
                (RunState::Running, _) => "",
            };
            log::debug!(
                "vCPU {} rip {}{state}",
                self.vcpu,
                self.describe(sample.rip, sample.cpl)
            );
        }
        if now.duration_since(self.window.started) >= REPORT_INTERVAL {
            self.report(now);
        }
    }

    /// Logs the report of the samples since the last one, if there are any.
    pub fn finish(&mut self) {
        self.report(Instant::now());
    }

    fn report(&mut self, now: Instant) {
        let window = std::mem::replace(&mut self.window, Window::new(now));
        if window.samples == 0 {
            return;
        }
        let report = self.summarise(window, now);
        let (lines, warning) = report.lines(self.vcpu);
        for line in lines {
            log::info!("{line}");
        }
        if let Some(warning) = warning {
            log::warn!("{warning}");
        }
    }

    fn summarise(&self, window: Window, now: Instant) -> Report {
        let mut ranked: Vec<(Place, u32)> = window.counts.into_iter().collect();
        let named = |place: &Place| self.place_name(*place);
        // Most samples first; equal counts in name order, so a report reads the same
        // every time.
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| named(&a.0).cmp(&named(&b.0))));
        let stuck = window.halted == 0
            && window.user == 0
            && window.samples >= STUCK_MIN_SAMPLES
            && !ranked.iter().any(|(place, _)| *place == Place::NotStarted)
            && ranked.len() <= STUCK_PLACES;
        Report {
            elapsed: now.duration_since(window.started),
            samples: window.samples,
            user: window.user,
            halted: window.halted,
            stuck_in: stuck.then(|| ranked.iter().map(|(p, _)| named(p)).collect()),
            top: (ranked.iter().take(TOP_FUNCTIONS))
                .map(|(place, count)| (named(place), *count))
                .collect(),
        }
    }

    fn place(&self, sample: &Sample) -> Place {
        if sample.state == RunState::NotStarted {
            return Place::NotStarted;
        }
        // Kernel symbols say nothing about a user-mode address.
        if sample.cpl == 3 {
            return Place::User;
        }
        match self.symbols.as_ref().and_then(|s| s.resolve(sample.rip)) {
            Some(resolved) => Place::Symbol(resolved.index),
            None => Place::Raw(sample.rip),
        }
    }

    fn place_name(&self, place: Place) -> String {
        match (place, &self.symbols) {
            (Place::Symbol(index), Some(symbols)) => symbols.name(index).to_string(),
            (Place::Symbol(index), None) => format!("symbol #{index}"),
            (Place::Raw(rip), _) => format!("{rip:#x}"),
            (Place::User, _) => "(user mode)".into(),
            (Place::NotStarted, _) => "(waiting for INIT/SIPI)".into(),
        }
    }

    /// `SYMBOL+0xOFF`, or the bare address in user mode or outside the symbols.
    fn describe(&self, rip: u64, cpl: u8) -> String {
        match self.symbols.as_ref().filter(|_| cpl != 3) {
            Some(symbols) => match symbols.resolve(rip) {
                Some(r) => format!("{}+{:#x}", r.name, r.offset),
                None => format!("{rip:#x}"),
            },
            None => format!("{rip:#x}"),
        }
    }
}

/// RIP, CPL and run state of a vCPU out of KVM_RUN.
fn read_sample(fd: &VcpuFd) -> Result<Sample, kvm_ioctls::Error> {
    let rip = fd.get_regs()?.rip;
    // CS.DPL is the CPL in protected and long mode (and 0 in real mode, as it should be).
    let cpl = fd.get_sregs()?.cs.dpl;
    let state = match fd.get_mp_state()?.mp_state {
        KVM_MP_STATE_RUNNABLE => RunState::Running,
        KVM_MP_STATE_HALTED => RunState::Halted,
        _ => RunState::NotStarted,
    };
    Ok(Sample { rip, cpl, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols() -> Arc<Symbols> {
        let dir = crate::testutil::TempDir::new("sampler");
        let map = dir.path().join("System.map");
        std::fs::write(
            &map,
            "1000 T idle\n2000 T busy\n3000 T lock\n4000 T other\n5000 T end\n",
        )
        .unwrap();
        Arc::new(Symbols::load(&map).unwrap())
    }

    fn kernel(rip: u64) -> Sample {
        Sample {
            rip,
            cpl: 0,
            state: RunState::Running,
        }
    }

    fn sampler_with(samples: &[(Sample, u32)]) -> RipSampler {
        let mut sampler = RipSampler::new(0, Duration::from_millis(5), Some(symbols()));
        let now = sampler.window.started;
        for (sample, times) in samples {
            for _ in 0..*times {
                sampler.record(*sample, now);
            }
        }
        sampler
    }

    fn summary(sampler: RipSampler) -> Report {
        let now = sampler.window.started + Duration::from_secs(2);
        let window = Window::new(now);
        let mut sampler = sampler;
        let window = std::mem::replace(&mut sampler.window, window);
        sampler.summarise(window, now)
    }

    #[test]
    fn report_ranks_by_count_then_name() {
        let halted = Sample {
            rip: 0x1010,
            cpl: 0,
            state: RunState::Halted,
        };
        let user = Sample {
            rip: 0x40_0000,
            cpl: 3,
            state: RunState::Running,
        };
        let sampler = sampler_with(&[
            (kernel(0x2004), 3),
            (kernel(0x2ff0), 2),
            (halted, 6),
            (user, 4),
            (kernel(0x3000), 5),
            (kernel(0x4000), 5),
            (kernel(0x10), 1),
        ]);
        let report = summary(sampler);
        assert_eq!(report.samples, 26);
        assert_eq!((report.user, report.halted), (4, 6));
        let top: Vec<(&str, u32)> = report.top.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(
            top,
            [
                ("idle", 6),
                ("busy", 5),
                ("lock", 5),
                ("other", 5),
                ("(user mode)", 4),
                ("0x10", 1),
            ]
        );
        assert_eq!(report.stuck_in, None);
        let (lines, warning) = report.lines(1);
        assert!(
            lines[0].starts_with("vCPU 1: 26 RIP samples in 2.0 s, 15.4% user mode, 23.1% halted"),
            "{}",
            lines[0]
        );
        assert_eq!(lines[1], "vCPU 1:  23.1%      6 idle");
        assert_eq!(lines.len(), 7);
        assert_eq!(warning, None);
    }

    #[test]
    fn report_keeps_the_top_fifteen() {
        let dir = crate::testutil::TempDir::new("sampler-many");
        let map = dir.path().join("System.map");
        let text: String = (1..=20)
            .map(|i| format!("{:x} T f{i:02}\n", i * 0x100))
            .collect();
        std::fs::write(&map, text).unwrap();
        let mut sampler = RipSampler::new(
            0,
            Duration::from_millis(5),
            Some(Arc::new(Symbols::load(&map).unwrap())),
        );
        let now = sampler.window.started;
        for i in 1..=20u32 {
            for _ in 0..i {
                sampler.record(kernel(u64::from(i) * 0x100), now);
            }
        }
        let report = summary(sampler);
        assert_eq!(report.top.len(), TOP_FUNCTIONS);
        assert_eq!(report.top[0], ("f20".to_string(), 20));
        assert_eq!(report.top[14], ("f06".to_string(), 6));
    }

    #[test]
    fn a_vcpu_spinning_in_few_functions_is_flagged() {
        let report = summary(sampler_with(&[(kernel(0x3001), 30), (kernel(0x2001), 10)]));
        assert_eq!(
            report.stuck_in,
            Some(vec!["lock".to_string(), "busy".to_string()])
        );
        let (_, warning) = report.lines(0);
        assert!(warning.unwrap().contains("all 40 running samples"));
    }

    #[test]
    fn idle_waiting_or_short_windows_are_not_flagged() {
        let halted = Sample {
            rip: 0x1001,
            cpl: 0,
            state: RunState::Halted,
        };
        let waiting = Sample {
            rip: 0xfff0,
            cpl: 0,
            state: RunState::NotStarted,
        };
        assert_eq!(summary(sampler_with(&[(halted, 40)])).stuck_in, None);
        assert_eq!(summary(sampler_with(&[(waiting, 40)])).stuck_in, None);
        assert_eq!(
            summary(sampler_with(&[(kernel(0x3001), 19)])).stuck_in,
            None
        );
        let spread: Vec<(Sample, u32)> = [0x1000, 0x2000, 0x3000, 0x4000]
            .map(|rip| (kernel(rip), 10))
            .to_vec();
        assert_eq!(summary(sampler_with(&spread)).stuck_in, None);
    }

    #[test]
    fn samples_name_symbol_and_offset() {
        let sampler = RipSampler::new(0, Duration::from_millis(5), Some(symbols()));
        assert_eq!(sampler.describe(0x2010, 0), "busy+0x10");
        assert_eq!(sampler.describe(0x2010, 3), "0x2010");
        assert_eq!(sampler.describe(0x10, 0), "0x10");
        let raw = RipSampler::new(0, Duration::from_millis(5), None);
        assert_eq!(raw.describe(0x2010, 0), "0x2010");
        let report = summary({
            let mut raw = raw;
            let now = raw.window.started;
            raw.record(kernel(0x2010), now);
            raw
        });
        assert_eq!(report.top, [("0x2010".to_string(), 1)]);
    }

    #[test]
    fn a_window_reports_and_restarts_after_the_interval() {
        let mut sampler = sampler_with(&[(kernel(0x2000), 3)]);
        let later = sampler.window.started + REPORT_INTERVAL;
        sampler.record(kernel(0x2000), later);
        assert_eq!(sampler.window.samples, 0);
        assert_eq!(sampler.window.started, later);
        sampler.record(kernel(0x2000), later);
        assert_eq!(sampler.window.samples, 1);
    }
}
