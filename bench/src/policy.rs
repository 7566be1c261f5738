//! Issue 13's figures: the Postfix policy service. (a) Policy requests per second and p99
//! latency, 50 connections each sending requests one at a time (as Postfix's smtpd processes
//! do), against the agent's release build. (b) Real Postfix sessions per second, smtp-source
//! driving a private Postfix whose RCPT restrictions ask the agent (`check_policy_service`),
//! beside the same Postfix with its own `check_helo_access texthash:` table, rounds
//! alternating, same run. Everything runs in one namespace on its loopback; the agent attaches
//! XDP in skb mode to that loopback.

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::{Netns, in_netns};
use tests::postfix::{DOMAIN, Postfix};
use tests::{AgentProcess, PinDir};

use crate::report::{Report, f};
use crate::{median, progress};

const POLICY: &str = "127.0.0.1:10040";
const WITH_POLICY: &str = "127.0.0.1:2525";
const WITH_ACCESS: &str = "127.0.0.1:2526";
const CONNECTIONS: usize = 50;
const REQUESTS_PER_CONNECTION: usize = 400;
const MESSAGES: usize = 1500;
const ROUNDS: usize = 5;

pub fn run(report: &mut Report, _out: &std::path::Path) -> anyhow::Result<()> {
    let ns = Netns::new("hfbp");
    let table = std::env::temp_dir().join(tests::unique("helo-bench-access-"));
    std::fs::write(
        &table,
        "mx.gw.test REJECT\ngw.test REJECT\n[198.51.100.1] REJECT\nlocalhost REJECT\n",
    )?;
    let extra = format!(
        "transport_maps = inline:{{{DOMAIN}=discard:}}\n\
         policy_restrictions = check_policy_service inet:{POLICY}, reject_unauth_destination\n\
         access_restrictions = check_helo_access texthash:{}, reject_unauth_destination\n",
        table.display()
    );
    let services = format!(
        "{WITH_POLICY} inet n - n - - smtpd\n  -o smtpd_recipient_restrictions=$policy_restrictions\n\
         {WITH_ACCESS} inet n - n - - smtpd\n  -o smtpd_recipient_restrictions=$access_restrictions\n"
    );
    progress("policy: starting a private Postfix");
    let postfix = Postfix::start(&ns, "bench-policy", &extra, &services);
    let pins = PinDir::new();
    let config = pins.config(&format!(
        "[allowlist]\nnetworks = []\n[identity]\ndetect = false\ndomains = [\"=mx.gw.test\", \"=gw.test\"]\n\
         [proxy]\nlisteners = []\n[policy]\nlisteners = [\"{POLICY}\"]\n"
    ));
    let name = ns.name.clone();
    let agent = AgentProcess::run_in(&ns, &config, "lo", "skb", &[], move || {
        in_netns(&name, || std::net::TcpStream::connect(POLICY).is_ok())
    });

    progress("policy: requests per second, 50 connections");
    let (rate, p50, p99) = requests(&ns)?;
    report.section(
        "Policy service: requests",
        &format!(
            "{CONNECTIONS} connections, each sending {REQUESTS_PER_CONNECTION} requests one at a \
             time (a complete smtpd_access_policy request with a good HELO, a new instance each) \
             and reading each answer before the next, as Postfix's smtpd processes do. The rules \
             run in full (empty allowlist)."
        ),
        &["requests/s", "p50 µs", "p99 µs"],
        &[vec![f(rate, 0), f(p50, 0), f(p99, 0)]],
        &[],
    );

    progress("policy: Postfix sessions per second, policy service vs check_helo_access");
    let (mut with_policy, mut with_access) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        with_policy.push(sessions(&ns, WITH_POLICY)?);
        with_access.push(sessions(&ns, WITH_ACCESS)?);
        progress(&format!(
            "policy: round {}: {:.0} vs {:.0} sessions/s",
            round + 1,
            with_policy[round],
            with_access[round]
        ));
    }
    let (policy_rate, access_rate) = (median(&mut with_policy), median(&mut with_access));
    let ratio = policy_rate / access_rate;
    report.section(
        "Policy service: real Postfix sessions",
        &format!(
            "smtp-source -s 20 -m {MESSAGES} (HELO, one small message a session) into one private \
             Postfix 3.7 (discard transport), alternating between two smtpd services that differ \
             only in smtpd_recipient_restrictions: check_policy_service to the agent, or \
             Postfix's own check_helo_access texthash: table. Median of {ROUNDS} rounds each."
        ),
        &["setup", "sessions/s", "ratio"],
        &[
            vec!["check_policy_service (helo-filter)".into(), f(policy_rate, 0), f(ratio, 2)],
            vec!["check_helo_access texthash:".into(), f(access_rate, 0), "1.00".into()],
        ],
        &[],
    );
    report.target(
        "Policy service: Postfix sessions/s within 10% of check_helo_access",
        ratio >= 0.9,
        format!("{policy_rate:.0} vs {access_rate:.0} sessions/s ({ratio:.2}x)"),
    );
    drop(agent);
    drop(postfix);
    let _ = std::fs::remove_file(&table);
    Ok(())
}

/// Requests per second over all connections, and the p50 and p99 latency in µs.
fn requests(ns: &Netns) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            ns.spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut stream = std::net::TcpStream::connect(POLICY)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut latencies = Vec::with_capacity(REQUESTS_PER_CONNECTION);
                let mut answer = [0u8; 14];
                for i in 0..REQUESTS_PER_CONNECTION {
                    let request = format!(
                        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
                         client_address=203.0.113.{}\nclient_name=unknown\nhelo_name=mail{c}.sender.example\n\
                         sender=a@sender.example\nrecipient=user@{DOMAIN}\ninstance={c}.{i}\n\n",
                        i % 250 + 1
                    );
                    let t = Instant::now();
                    stream.write_all(request.as_bytes())?;
                    stream.read_exact(&mut answer)?;
                    anyhow::ensure!(&answer == b"action=DUNNO\n\n", "unexpected answer {answer:?}");
                    latencies.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.join().map_err(|_| anyhow::anyhow!("a request thread panicked"))??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok((all.len() as f64 / elapsed, at(0.5), at(0.99)))
}

/// One smtp-source run against `server`: sessions per second.
fn sessions(ns: &Netns, server: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .args([
            "smtp-source",
            "-s",
            "20",
            "-m",
            &MESSAGES.to_string(),
            "-M",
            "mail.bench-sender.example",
        ])
        .args(["-f", "a@bench-sender.example", "-t", &format!("user@{DOMAIN}"), server])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "smtp-source against {server} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(MESSAGES as f64 / started.elapsed().as_secs_f64())
}
