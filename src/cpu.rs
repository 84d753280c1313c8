//! CPU use of the machine and of given processes, read from /proc, so a
//! scale-out bench can say whether a run had CPU left for another engine.
//! Elsewhere than Linux every reading is `None` and reports leave it out.

use std::time::Instant;

/// Clock ticks per second of /proc's counters (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// The machine's CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct MachineSample {
    busy: u64,
    total: u64,
}

impl MachineSample {
    /// The counters now, from the first line of /proc/stat.
    pub fn now() -> Option<MachineSample> {
        parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The share of every CPU's time spent busy since `earlier`, 0.0..=1.0.
    pub fn busy_since(&self, earlier: &MachineSample) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy as f64 / total as f64)
    }
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle and iowait
/// are not busy; guest time is already inside user.
fn parse_stat(text: &str) -> Option<MachineSample> {
    let line = text.lines().next()?;
    let mut fields = line.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some(MachineSample {
        busy,
        total: busy + idle + iowait,
    })
}

/// CPU seconds (user + system) a process has used so far.
pub fn process_seconds(pid: u32) -> Option<f64> {
    parse_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime and stime are fields 14 and 15 of /proc/<pid>/stat; the command name
/// (field 2) is parenthesized and may hold spaces, so count after its `)`.
fn parse_pid_stat(text: &str) -> Option<f64> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_S)
}

/// The machine's and some processes' CPU over a window.
#[derive(Debug)]
pub struct Window {
    started: Instant,
    machine: Option<MachineSample>,
    processes: Vec<(u32, Option<f64>)>,
    own: Option<f64>,
}

/// What a window measured.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Share of the machine's CPU time that was busy (every process counted).
    pub machine_busy: f64,
    /// CPU seconds the watched processes used.
    pub processes_seconds: f64,
    /// CPU seconds this process used (a bench: its load and its watchers).
    pub own_seconds: f64,
    /// The window's wall-clock length, in seconds.
    pub wall_seconds: f64,
    pub cpus: usize,
}

impl Window {
    pub fn start(pids: &[u32]) -> Window {
        Window {
            started: Instant::now(),
            machine: MachineSample::now(),
            processes: pids.iter().map(|&p| (p, process_seconds(p))).collect(),
            own: process_seconds(std::process::id()),
        }
    }

    /// The usage since `start`; `None` where /proc cannot tell.
    pub fn finish(&self) -> Option<Usage> {
        let machine_busy = MachineSample::now()?.busy_since(self.machine.as_ref()?)?;
        let mut processes_seconds = 0.0;
        for &(pid, before) in &self.processes {
            processes_seconds += process_seconds(pid)? - before?;
        }
        Some(Usage {
            machine_busy,
            processes_seconds,
            own_seconds: process_seconds(std::process::id())? - self.own?,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
        })
    }
}

impl Usage {
    /// CPU seconds the machine spent busy outside the watched processes and
    /// this one (on a bench's machine: the broker, mostly).
    pub fn others_seconds(&self) -> f64 {
        let busy = self.machine_busy * self.cpus as f64 * self.wall_seconds;
        (busy - self.processes_seconds - self.own_seconds).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_line_and_a_process_line() {
        let stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\n";
        let before = parse_stat(stat).expect("a cpu line");
        assert_eq!(before.busy, 100 + 5 + 50 + 3 + 2 + 10);
        assert_eq!(before.total, before.busy + 800 + 20);
        let later = parse_stat("cpu  200 5 50 900 20 3 2 10 7 0\n").expect("a cpu line");
        assert_eq!(later.busy_since(&before), Some(0.5));
        assert_eq!(before.busy_since(&later), None, "counters never go back");
        assert!(parse_stat("intr 1 2 3\n").is_none());
        assert!(parse_stat("cpu  1 2 x 4 5 6 7 8\n").is_none());

        // A command name with spaces and a parenthesis must not shift the fields.
        let pid = "4242 (tasker (run) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 75 0 0 20 0 9 0";
        assert_eq!(parse_pid_stat(pid), Some(2.25));
        assert_eq!(parse_pid_stat("4242 (tasker) S 1"), None);
    }

    #[test]
    fn the_rest_is_what_the_machine_spent_beyond_the_watched_processes() {
        let mut u = Usage {
            machine_busy: 0.75,
            processes_seconds: 1.5,
            own_seconds: 0.5,
            wall_seconds: 2.0,
            cpus: 2,
        };
        assert!(
            (u.others_seconds() - 1.0).abs() < 1e-9,
            "3 busy - 1.5 - 0.5"
        );
        u.processes_seconds = 3.0; // ticks rounded up past the machine's count
        assert_eq!(u.others_seconds(), 0.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_window_counts_the_cpu_a_process_burns() {
        // The kernel's own process CPU clock is the independent witness.
        let cpu_clock = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
            t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
        };
        let window = Window::start(&[std::process::id()]);
        let from = cpu_clock();
        let mut x = 0u64;
        while cpu_clock() - from < 0.5 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let burnt = cpu_clock() - from;
        let usage = window.finish().expect("/proc is readable on Linux");
        // /proc counts in 10 ms ticks, and the test harness's threads run too.
        assert!(
            usage.own_seconds >= burnt - 0.05,
            "{burnt:.2} s of spinning showed as {} CPU-s of this process",
            usage.own_seconds
        );
        assert!(
            usage.processes_seconds >= burnt - 0.05,
            "{burnt:.2} s of spinning showed as {} CPU-s",
            usage.processes_seconds
        );
        assert!(usage.machine_busy > 0.0 && usage.machine_busy <= 1.0);
        assert!(usage.cpus >= 1 && usage.wall_seconds > 0.0);
    }
}
