//! What a decision costs besides its latency: the CPU time quotad and Redis spend on it, and the
//! Redis commands it runs (the commands a script runs included: Redis counts those in `INFO
//! commandstats` too). Read just before and just after each measurement and divided by the
//! decisions answered in it: quotad's CPU from `/proc/<pid>/stat` of the process listening on the
//! `--url` port (when it runs on this machine), Redis' from `INFO cpu`, commands from `INFO
//! commandstats`. CPU time moves far less than requests/s on a shared machine.
//!
//! Everything else that runs meanwhile is in the figures: quotad's flusher (part of what a
//! decision costs), and any other client of the same Redis (which is why the bench wants a Redis
//! of its own).

use std::collections::BTreeMap;

use std::time::Duration;

use deadpool_redis::redis;

/// How long one reading waits for Redis. A Redis that does not answer by then (hung, or
/// unreachable) leaves that reading without Redis figures: the cost line then omits Redis' CPU
/// and commands instead of holding the bench up.
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Where the costs are read from.
pub struct Probe {
    /// Each Redis node read (one, or a cluster's nodes given comma-separated), by its URL.
    redis: Vec<(String, redis::Client)>,
    /// The quotad process, when it listens on this machine.
    pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat`'s times.
    hz: f64,
    /// How long a reading waits for Redis.
    deadline: Duration,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// quotad's user + system CPU time, in ticks.
    quotad_ticks: Option<u64>,
    /// Redis' user + system CPU time, in seconds (summed over the nodes; `None` unless every
    /// node answered).
    redis_cpu: Option<f64>,
    /// Each node's, in the probe's order.
    node_cpu: Vec<Option<f64>>,
    /// Calls per Redis command.
    commands: BTreeMap<String, u64>,
}

/// The cost per decision of one measurement.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    /// quotad's CPU time per decision, µs (`None` when quotad is not a local process).
    pub quotad_us: Option<f64>,
    /// Redis' CPU time per decision, µs (all nodes read).
    pub redis_us: Option<f64>,
    /// With several nodes read: each node's CPU time per decision, µs, by its URL.
    pub node_us: Vec<(String, f64)>,
    /// Redis commands per decision, all kinds.
    pub commands: Option<f64>,
    /// Commands per decision by kind, most first.
    pub by_command: Vec<(String, f64)>,
}

impl Probe {
    /// A probe of the Redis at `redis_url` (or of each node of a comma-separated list: a
    /// cluster's) and of the local process listening on `quotad_addr`'s port, if any.
    pub fn new(redis_url: &str, quotad_addr: &str) -> Probe {
        let pid = quotad_addr
            .rsplit_once(':')
            .and_then(|(host, port)| {
                let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0");
                local.then(|| port.parse().ok()).flatten()
            })
            .and_then(listener_pid);
        Probe {
            redis: redis_url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .filter_map(|u| Some((u.to_owned(), redis::Client::open(u).ok()?)))
                .collect(),
            pid,
            hz: clock_ticks_per_second(),
            deadline: READ_DEADLINE,
        }
    }

    /// Whether quotad's CPU can be read.
    pub fn sees_quotad(&self) -> bool {
        self.pid.is_some()
    }

    /// The counters now.
    pub async fn read(&self) -> Reading {
        let mut reading = Reading {
            quotad_ticks: self.pid.and_then(process_ticks),
            ..Reading::default()
        };
        if self.redis.is_empty() {
            return reading;
        }
        let mut total = Some(0.0);
        for (_, client) in &self.redis {
            let info = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("INFO")
                    .arg("cpu")
                    .arg("commandstats")
                    .query_async::<String>(&mut conn)
                    .await
            };
            let cpu = match tokio::time::timeout(self.deadline, info).await {
                Ok(Ok(text)) => {
                    for (name, calls) in command_calls(&text) {
                        *reading.commands.entry(name).or_default() += calls;
                    }
                    redis_cpu(&text)
                }
                _ => None,
            };
            total = total.zip(cpu).map(|(t, c)| t + c);
            reading.node_cpu.push(cpu);
        }
        reading.redis_cpu = total;
        reading
    }

    /// The cost per decision between two readings around `decisions` decisions.
    pub fn cost(&self, before: &Reading, after: &Reading, decisions: u64) -> Cost {
        if decisions == 0 {
            return Cost::default();
        }
        let per = |total: f64| total / decisions as f64;
        let quotad_us = match (before.quotad_ticks, after.quotad_ticks) {
            (Some(b), Some(a)) => Some(per(a.saturating_sub(b) as f64 / self.hz * 1e6)),
            _ => None,
        };
        let redis_us = match (before.redis_cpu, after.redis_cpu) {
            (Some(b), Some(a)) => Some(per((a - b).max(0.0) * 1e6)),
            _ => None,
        };
        let node_us = match self.redis.len() {
            0 | 1 => Vec::new(),
            _ => self
                .redis
                .iter()
                .zip(before.node_cpu.iter().zip(&after.node_cpu))
                .filter_map(|((url, _), (b, a))| {
                    Some((url.clone(), per((a.as_ref()? - b.as_ref()?).max(0.0) * 1e6)))
                })
                .collect(),
        };
        // Commands only from two readings of Redis: one missing would count every call since Redis
        // started.
        let both = before.redis_cpu.is_some() && after.redis_cpu.is_some();
        let mut by_command: Vec<(String, f64)> = after
            .commands
            .iter()
            // The probe's own INFO is not the decisions' work.
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, calls)| {
                let was = before.commands.get(name).copied().unwrap_or(0);
                (name.clone(), per(calls.saturating_sub(was) as f64))
            })
            .filter(|(_, n)| both && *n > 0.0)
            .collect();
        by_command.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let commands = both.then(|| by_command.iter().map(|(_, n)| n).sum());
        Cost {
            quotad_us,
            redis_us,
            node_us,
            commands,
            by_command,
        }
    }
}

impl Cost {
    /// `quotad 25.1 µs  redis 13.4 µs  11.30 cmds` (what is unknown is left out).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(q) = self.quotad_us {
            parts.push(format!("quotad {q:.1} µs"));
        }
        if let Some(r) = self.redis_us {
            parts.push(format!("redis {r:.1} µs"));
        }
        if !self.node_us.is_empty() {
            let nodes: Vec<String> = self
                .node_us
                .iter()
                .map(|(url, us)| {
                    let port = url.rsplit(':').next().unwrap_or(url);
                    format!(":{port} {us:.1}")
                })
                .collect();
            parts.push(format!("(by node: {})", nodes.join(", ")));
        }
        if let Some(c) = self.commands {
            parts.push(format!("{c:.2} redis cmds"));
        }
        if parts.is_empty() {
            return String::new();
        }
        format!("per decision: {}", parts.join("  "))
    }

    /// `evalsha 1.00, hget 2.30, …`.
    pub fn breakdown(&self) -> String {
        self.by_command
            .iter()
            .map(|(name, n)| format!("{name} {n:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `used_cpu_sys` + `used_cpu_user` of an `INFO cpu` reply, seconds.
fn redis_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// Calls per command of an `INFO commandstats` reply (`cmdstat_get:calls=10,usec=…`).
fn command_calls(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .trim()
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// utime + stime of a process, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The process with a socket listening on TCP `port` (IPv4 or IPv6), from `/proc/net/tcp*` and
/// the processes' file descriptors.
fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
                // State 0A is LISTEN.
                (local_port == port && *f.get(3)? == "0A")
                    .then(|| f.get(9).map(|s| s.to_string()))?
            })
        })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

/// `sysconf(_SC_CLK_TCK)`, as `getconf` prints it; 100 (Linux' USER_HZ) if it cannot be asked.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_replies_are_read() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\r\n# Commandstats\r\ncmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\ncmdstat_hget:calls=23,usec=5,usec_per_call=0.2\r\n";
        assert_eq!(redis_cpu(info), Some(3.75));
        let calls = command_calls(info);
        assert_eq!(calls.get("evalsha"), Some(&10));
        assert_eq!(calls.get("hget"), Some(&23));
    }

    #[test]
    fn costs_are_per_decision_and_leave_the_probe_out() {
        let probe = Probe {
            redis: Vec::new(),
            pid: None,
            hz: 100.0,
            deadline: READ_DEADLINE,
        };
        let before = Reading {
            quotad_ticks: Some(100),
            redis_cpu: Some(1.0),
            commands: [("evalsha".into(), 5), ("info".into(), 1)].into(),
            ..Reading::default()
        };
        let after = Reading {
            quotad_ticks: Some(150),
            redis_cpu: Some(1.1),
            node_cpu: Vec::new(),
            commands: [
                ("evalsha".into(), 10_005),
                ("hget".into(), 23_000),
                ("info".into(), 2),
            ]
            .into(),
        };
        let cost = probe.cost(&before, &after, 10_000);
        // 50 ticks of 10 ms over 10,000 decisions.
        assert!((cost.quotad_us.unwrap() - 50.0).abs() < 1e-9);
        assert!((cost.redis_us.unwrap() - 10.0).abs() < 1e-9);
        assert!((cost.commands.unwrap() - 3.3).abs() < 1e-9);
        assert_eq!(cost.breakdown(), "hget 2.30, evalsha 1.00");
        // A reading that missed Redis gives no Redis figures, not every call since it started.
        let missed = Reading {
            redis_cpu: None,
            commands: BTreeMap::new(),
            ..before
        };
        let partial = probe.cost(&missed, &after, 10_000);
        assert_eq!((partial.redis_us, partial.commands), (None, None));
        assert!(partial.by_command.is_empty());
        assert_eq!(
            partial.quotad_us, cost.quotad_us,
            "quotad's CPU is read on its own"
        );
    }

    #[test]
    fn a_cluster_s_nodes_are_summed_and_each_reported() {
        let node = |port: u16| {
            let url = format!("redis://127.0.0.1:{port}");
            (url.clone(), redis::Client::open(url).unwrap())
        };
        let probe = Probe {
            redis: vec![node(7001), node(7002)],
            pid: None,
            hz: 100.0,
            deadline: READ_DEADLINE,
        };
        let before = Reading {
            redis_cpu: Some(3.0),
            node_cpu: vec![Some(1.0), Some(2.0)],
            ..Reading::default()
        };
        let after = Reading {
            redis_cpu: Some(3.3),
            node_cpu: vec![Some(1.1), Some(2.2)],
            ..Reading::default()
        };
        let cost = probe.cost(&before, &after, 10_000);
        assert!((cost.redis_us.unwrap() - 30.0).abs() < 1e-9);
        let by_node: Vec<(u16, f64)> = cost
            .node_us
            .iter()
            .map(|(u, us)| {
                (
                    u.rsplit(':').next().unwrap().parse().unwrap(),
                    (us * 10.0).round() / 10.0,
                )
            })
            .collect();
        assert_eq!(by_node, vec![(7001, 10.0), (7002, 20.0)]);
        assert!(
            cost.summary().contains("(by node: :7001 10.0, :7002 20.0)"),
            "{}",
            cost.summary()
        );
    }

    #[tokio::test]
    async fn a_redis_that_never_answers_leaves_the_reading_without_redis_figures_in_time() {
        // Accepts connections and never replies: a hung Redis.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", hung.local_addr().unwrap());
        let mut probe = Probe::new(&url, "example.com:80");
        probe.deadline = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let reading = probe.read().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(reading.redis_cpu.is_none() && reading.commands.is_empty());
        assert!(reading.quotad_ticks.is_none(), "quotad is not local here");
    }

    #[test]
    fn this_process_is_found_by_its_listening_port_and_its_cpu_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        assert!(process_ticks(std::process::id()).is_some());
    }
}
