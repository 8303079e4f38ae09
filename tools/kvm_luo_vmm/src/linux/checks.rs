// SPDX-License-Identifier: GPL-2.0
//! What the VMM reads in the guest's console to know the guest is well: its work's heartbeat,
//! clock and per-CPU tickers, the generations of memory each vCPU verified, answers to `ping`,
//! and nothing in it about oopses, lockups, stalls or a reboot.

use super::machine::Guest;
use super::{ms, ClockMode, Stamps};
use crate::devices::Console;
use crate::say;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// What in the guest's console means it is not well.
const TROUBLE: &[&str] = &[
    "Oops",
    "BUG:",
    "WARNING:",
    "Kernel panic",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched detected stall",
    "rcu: INFO",
    "blocked for more than",
    "CORRUPT",
    "FAILED",
];
/// What in the guest's console after resume means it started again instead of going on, or
/// that its clocks did not take the pause well (at boot, the kernel names its clocksources).
const AFTER_RESUME: &[&str] = &["Linux version", "GUEST: init", "clocksource", "unstable"];

/// The guest's heartbeat period, in seconds (its workload, guest/work.c, sleeps 250 ms between
/// beats).
const BEAT_SECS: f64 = 0.25;
/// Every vCPU's ticker (guest/work.c, woken every 50 ms by its CPU's timer) must wake this
/// many times over `TICK_SPAN` of guest time.
const MIN_TICKS: u64 = 10;
const TICK_SPAN: f64 = 2.0;
/// How long the VMM waits for that, in wall time (the guests of a fleet share one CPU).
const TICK_WAIT_SECS: u64 = 60;

/// What runs the guest's vCPUs, as the checks see it: ours, or another VMM (the soak's QEMU).
pub trait Vcpus {
    /// How many vCPUs the guest has.
    fn count(&self) -> usize;
    /// Whether a vCPU stopped on an error (or the other VMM went away).
    fn any_failed(&self) -> bool;
}

/// Where the guest's work was when it was paused.
#[derive(Serialize, Deserialize, Default, Clone)]
pub struct Progress {
    pub beat: u64,
    pub mono: f64,
    pub generations: Vec<u64>,
}

/// One heartbeat line: its number, the guest's CLOCK_MONOTONIC, each CPU's ticker.
struct Beat {
    n: u64,
    mono: f64,
    ticks: Vec<u64>,
}

impl Beat {
    fn parse(line: &str) -> Option<Self> {
        let mut w = line.split_whitespace();
        if (w.next(), w.next()) != (Some("WORK:"), Some("beat")) {
            return None;
        }
        let n = w.next()?.parse().ok()?;
        if w.next() != Some("at") {
            return None;
        }
        let mono = w.next()?.parse().ok()?;
        let ticks = if w.next() == Some("ticks") {
            w.map_while(|t| t.parse().ok()).collect()
        } else {
            Vec::new()
        };
        Some(Self { n, mono, ticks })
    }
}

impl Progress {
    /// Reads the heartbeat and the generations out of console lines.
    pub fn scan(lines: &[String], vcpus: usize) -> Self {
        let mut p = Self {
            generations: vec![0; vcpus],
            ..Default::default()
        };
        p.scan_more(lines);
        p
    }

    /// Reads on, in the lines that followed those it was read from.
    pub fn scan_more(&mut self, lines: &[String]) {
        let vcpus = self.generations.len();
        for line in lines {
            if let Some(b) = Beat::parse(line) {
                self.beat = b.n;
                self.mono = b.mono;
                continue;
            }
            let mut w = line.split_whitespace();
            if let (Some("WORK:"), Some("cpu"), Some(c), Some("generation"), Some(g)) =
                (w.next(), w.next(), w.next(), w.next(), w.next())
            {
                let g = g.trim_end_matches(':');
                if let (Ok(c), Ok(g)) = (c.parse::<usize>(), g.parse()) {
                    if c < vcpus {
                        self.generations[c] = g;
                    }
                }
            }
        }
    }
}

pub fn trouble(line: &str) -> bool {
    TROUBLE.iter().any(|t| line.contains(t))
}

/// Waits for the guest's console to show what `what` describes. Fails on a timeout, on
/// trouble in the console, or when a vCPU stops.
pub fn wait_console(
    console: &Console,
    running: &dyn Vcpus,
    from: usize,
    secs: u64,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let problem = loop {
        if console.wait_for(from, Duration::from_millis(500), &pred) {
            return Ok(());
        }
        if let Some(t) = console.since(from).iter().find(|l| trouble(l)) {
            break format!("the guest reports trouble: {t}");
        }
        if running.any_failed() {
            break format!("a vCPU stopped while waiting for {what}");
        }
        if Instant::now() >= deadline {
            break format!("no {what} from the guest in {secs} s");
        }
    };
    // What the guest said before the failure goes to the log first.
    std::thread::sleep(Duration::from_millis(500));
    console.flush();
    Err(problem)
}

/// Every vCPU has verified generation `gen` or a later one.
pub fn generations_reached(lines: &[String], vcpus: usize, gen: &[u64]) -> bool {
    let p = Progress::scan(lines, vcpus);
    p.generations
        .iter()
        .zip(gen)
        .all(|(have, want)| have >= want)
}

/// How much each CPU's ticker advanced between the first heartbeat of `lines` and the last,
/// and the guest time between them.
fn tick_advance(lines: &[String], vcpus: usize) -> Option<(f64, Vec<u64>)> {
    let mut beats = lines.iter().filter_map(|l| Beat::parse(l));
    let first = beats.find(|b| b.ticks.len() >= vcpus)?;
    let last = beats.rfind(|b| b.ticks.len() >= vcpus)?;
    let advance = (0..vcpus)
        .map(|c| last.ticks[c].saturating_sub(first.ticks[c]))
        .collect();
    Some((last.mono - first.mono, advance))
}

fn all_ticking(lines: &[String], vcpus: usize) -> bool {
    tick_advance(lines, vcpus)
        .is_some_and(|(span, adv)| span >= TICK_SPAN && adv.iter().all(|&a| a >= MIN_TICKS))
}

/// Checks that every vCPU takes timer interrupts, from console line `from` on: each CPU's
/// ticker, which only its own timer wakes, goes on. A vCPU whose timer was lost is named.
pub fn timers_tick(console: &Console, running: &dyn Vcpus, from: usize) -> Result<(), String> {
    let n = running.count();
    wait_console(
        console,
        running,
        from,
        TICK_WAIT_SECS,
        "timer interrupts on every vCPU",
        |l| all_ticking(l, n),
    )
    .map_err(|e| match tick_advance(&console.since(from), n) {
        Some((span, adv)) => {
            let dead: Vec<_> = (0..n).filter(|&c| adv[c] < MIN_TICKS).collect();
            format!(
                "{e}: over {span:.1} s of guest time the tickers woke {adv:?} times; \
                 vCPUs {dead:?} take no timer interrupts"
            )
        }
        None => e,
    })
}

/// Checks the first boot: the work runs and verified a generation on every vCPU, the
/// heartbeat goes, every vCPU takes timer interrupts, and the guest sees no virtualization
/// (the VMM does not save nested state).
pub fn booted(console: &Console, running: &dyn Vcpus) -> Result<(), String> {
    let n = running.count();
    wait_console(console, running, 0, 900, "work", |l| {
        generations_reached(l, n, &vec![1; n]) && Progress::scan(l, n).beat >= 4
    })?;
    let init = console
        .since(0)
        .into_iter()
        .find(|l| l.starts_with("GUEST: init"))
        .unwrap_or_default();
    if !init.ends_with("virtualization none") {
        return Err(format!(
            "the guest's CPU offers virtualization, which this VMM hides: {init}"
        ));
    }
    timers_tick(console, running, 0)
}

/// Asks the guest's shell to answer ping `n`, typed in by `type_in`, and waits for the answer.
pub fn ping(
    console: &Console,
    running: &dyn Vcpus,
    type_in: impl FnOnce(&str) -> std::io::Result<()>,
    n: u32,
) -> Result<(), String> {
    let from = console.len();
    type_in(&format!("ping {n}\n")).map_err(|e| format!("serial input: {e}"))?;
    let want = format!("GUEST: pong {n}");
    wait_console(
        console,
        running,
        from,
        60,
        "answer on the serial console",
        |l| l.iter().any(|x| x.contains(&want)),
    )
}

/// Watches the guest for `secs`: its timers keep ticking on every vCPU, and it reports no
/// trouble.
pub fn watch(console: &Console, running: &dyn Vcpus, secs: u64) -> Result<(), String> {
    let from = console.len();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let mark = console.len();
        timers_tick(console, running, mark)?;
    }
    match console.since(from).iter().find(|l| trouble(l)) {
        Some(t) => Err(format!("the guest reports trouble: {t}")),
        None => Ok(()),
    }
}

impl Guest {
    /// Asks the guest's shell to answer, and waits for the answer.
    pub fn ping(&mut self) -> Result<(), String> {
        self.pings += 1;
        let io = &self.m.io;
        ping(
            &self.m.console,
            &self.running,
            |t| io.type_in(t),
            self.pings,
        )
    }

    /// Checks that the guest, resumed from where `p0` was at `stamps.stopped`, went on: its
    /// console lines from `from` on show the next heartbeat with a clock that took the pause
    /// as `clock` says, every vCPU takes timer interrupts, two more verified generations on
    /// every vCPU, an answer on the console, and no complaint for 5 s.
    pub fn check_went_on(
        &mut self,
        p0: &Progress,
        stamps: &Stamps,
        clock: ClockMode,
        from: usize,
        label: &str,
    ) -> Result<(), String> {
        // How long the guest was stopped (the TSC goes on across a kexec): from its stop to the
        // first entry of a vCPU after it.
        let resumed = match self.running.first_entry() {
            0 => crate::rdtsc(),
            t => t,
        };
        let paused = ms(resumed.saturating_sub(stamps.stopped), stamps.hz) / 1e3;
        let n = self.running.count();
        let (console, running) = (&self.m.console, &self.running);
        // The heartbeat goes on from where it was: the next beat, not a reboot's first.
        wait_console(console, running, from, 120, "heartbeat", |l| {
            Progress::scan(l, n).beat > p0.beat
        })?;
        let beats: Vec<Beat> = console
            .since(from)
            .iter()
            .filter_map(|l| Beat::parse(l))
            .collect();
        let Some(first) = beats.first().map(|b| b.n) else {
            return Err("no heartbeat line after resume".into());
        };
        // The next beat, or the one after if a kernel message garbled the next one's line; a
        // guest that started again counts from 1.
        if !(p0.beat + 1..=p0.beat + 2).contains(&first) {
            return Err(format!(
                "the heartbeat went from {} to {first}: the guest did not simply go on",
                p0.beat
            ));
        }
        // The first beat after resume may carry a clock read before the pause (its line was
        // not out yet): with the clock moved on, the pause shows from the beat after it.
        let mut first_beat = beats[0].mono;
        let (lo, hi) = match clock {
            // The restored clock hides the pause: the gap is a beat plus however long the vCPU
            // waited for a host CPU, and never more than a beat and half the pause (two beats
            // for a short pause), so a pause the guest saw always fails.
            ClockMode::Hide => (
                0.0,
                crate::clock_gap().min((BEAT_SECS + paused / 2.0).max(2.0 * BEAT_SECS)),
            ),
            // The clock moved on by the pause, as the host's CLOCK_REALTIME measured it (which
            // a kexec may set from the RTC, to the second each side): the second beat after
            // resume is two beats and the pause on, a second either way.
            ClockMode::Advance => {
                wait_console(console, running, from, 120, "heartbeat", |l| {
                    Progress::scan(l, n).beat > p0.beat + 1
                })?;
                first_beat = console
                    .since(from)
                    .iter()
                    .filter_map(|l| Beat::parse(l))
                    .find(|b| b.n > p0.beat + 1)
                    .map_or(first_beat, |b| b.mono);
                (
                    paused - 1.5,
                    paused + 2.0 * BEAT_SECS + crate::clock_gap() + 1.0,
                )
            }
        };
        let gap = first_beat - p0.mono;
        if !(lo..hi).contains(&gap) {
            return Err(format!(
                "the guest's clock moved by {gap:.3} s across a pause of {paused:.1} s \
                 ({lo:.3} to {hi:.3} s allowed with the clock {clock:?})"
            ));
        }
        say(format!(
            "{label}the guest went on: heartbeat {} -> {first}, its clock {:.3} -> \
             {first_beat:.3} s ({})",
            p0.beat,
            p0.mono,
            match clock {
                ClockMode::Hide => "the pause hidden",
                ClockMode::Advance => "moved on by the pause",
            }
        ));
        timers_tick(console, running, from)?;
        say(format!("{label}every vCPU takes timer interrupts"));
        // Two more generations on every vCPU: the one the pause interrupted, whose check reads
        // what was written before the pause, and a whole one after.
        let want: Vec<u64> = p0.generations.iter().map(|g| g + 2).collect();
        wait_console(console, running, from, 900, "verified generations", |l| {
            generations_reached(l, n, &want)
        })?;
        say(format!(
            "{label}its memory checks verify: generations {:?} -> {:?}",
            p0.generations, want
        ));
        self.ping()?;
        say(format!("{label}its console answers"));
        let (console, quiet_from) = (&self.m.console, self.m.console.len());
        std::thread::sleep(Duration::from_secs(5));
        if let Some(t) = console.since(quiet_from).iter().find(|l| trouble(l)) {
            return Err(format!("the guest reports trouble: {t}"));
        }
        if let Some(t) = console
            .since(from)
            .iter()
            .find(|l| trouble(l) || AFTER_RESUME.iter().any(|r| l.contains(r)))
        {
            return Err(format!("after resume, the guest's console has: {t}"));
        }
        say(format!(
            "{label}nothing in the guest's console about lockups, stalls, clocks or oopses"
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn beats_with_and_without_tickers() {
        let b = Beat::parse("WORK: beat 7 at 12.500 ticks 40 39").unwrap();
        assert_eq!((b.n, b.mono, b.ticks), (7, 12.5, vec![40, 39]));
        let b = Beat::parse("WORK: beat 7 at 12.500").unwrap();
        assert!(b.ticks.is_empty());
        assert!(Beat::parse("WORK: cpu 0 generation 3: 80 MiB").is_none());
    }

    #[test]
    fn a_cpu_whose_ticker_stops_is_seen() {
        let ok = lines(&[
            "WORK: beat 1 at 1.000 ticks 5 5",
            "WORK: beat 9 at 3.000 ticks 45 44",
        ]);
        assert!(all_ticking(&ok, 2));
        let dead = lines(&[
            "WORK: beat 1 at 1.000 ticks 5 5",
            "WORK: beat 9 at 3.000 ticks 45 6",
        ]);
        assert!(!all_ticking(&dead, 2));
        assert_eq!(tick_advance(&dead, 2).unwrap().1, vec![40, 1]);
        // Too short a span says nothing yet.
        let short = lines(&[
            "WORK: beat 1 at 1.000 ticks 5 5",
            "WORK: beat 2 at 1.250 ticks 10 10",
        ]);
        assert!(!all_ticking(&short, 2));
    }
}
