//! Issue 17, the headline: returning bots. A bot opens a session with a forged HELO (the
//! gateway's own name), is refused, and comes back with a fresh, valid-looking HELO to deliver
//! its message after 0 ms, 100 ms, 1 s or 10 s; legitimate senders deliver alongside. The same
//! scenario, in the same run, against four gateways an admin could run:
//!
//! 1. Postfix alone, with the seed's recipe (`check_helo_access` for its own names and
//!    addresses in `smtpd_helo_restrictions`, `smtpd_delay_reject = yes`);
//! 2. the same Postfix with Debian's fail2ban watching its log (its `postfix` jail, an
//!    nftables ban action, a ban time like ours);
//! 3. helo-filter's proxy in front of Postfix (XDP native on the gateway's veth);
//! 4. helo-filter's policy service inside Postfix (XDP native too).
//!
//! Two namespaces joined by a veth: the gateway (one private Postfix, one address per setup)
//! and the clients (one address per bot and per legitimate sender on the veth, so every bot
//! is its own source). Counted: the bots' messages that Postfix delivered (its capture pipe),
//! the legitimate ones, the bots' sessions that reached an smtpd (Postfix's log), the CPU of
//! the gateway's processes, and the time from the forged HELO to the ban (fail2ban's and the
//! agent's logs). Every resource is a guard: namespaces, Postfix, fail2ban, agents, pins.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use tests::netns::{Netns, in_netns, veth};
use tests::postfix::{Postfix, UPSTREAM};
use tests::{AgentProcess, PinDir};

use crate::client::{self, Bounds, Ended, session};
use crate::gateway::{Dnsmasq, Fail2ban, RemoveFile, Setup, cpu_between, ns_id_of, ns_processes};
use crate::report::{Report, f};
use crate::{median, progress};

/// Return delays after the forged session, ms.
const DELAYS_MS: [u64; 4] = [0, 100, 1000, 10_000];
/// Bots per delay and setup: 200 bot addresses a setup.
const BOTS: usize = 50;
/// Legitimate senders per setup, one message each, spread over the bots' time.
const LEGIT: usize = 20;
/// Bots start spread over this long (the agent's default ban rate cap is 100/s).
const STAGGER: Duration = Duration::from_secs(3);
/// A return connection that is not answered in 3 s is counted as dropped; a session (the
/// pregreet wait of 6 s included) ends in 30 s.
const BOUNDS: Bounds = Bounds { connect: Duration::from_secs(3), session: Duration::from_secs(30) };
/// Postfix's own names and addresses: what a forging bot says.
const FORGED: &str = "mx.gw.test";
const POLICY: &str = "127.0.0.1:10040";

/// The setups in the order they run: fail2ban first, so it never reads another setup's
/// rejections; and in the order they are shown.
const RUN_ORDER: [Setup; 4] = [Setup::Fail2ban, Setup::Postfix, Setup::Proxy, Setup::Policy];
const SHOWN: [Setup; 4] = [Setup::Postfix, Setup::Fail2ban, Setup::Proxy, Setup::Policy];

/// Where this section puts a setup and its clients on 10.98.0.0/16.
trait Addresses {
    fn index(self) -> u8;
    fn server(self) -> SocketAddrV4;
    fn bot(self, d: usize, n: usize) -> Ipv4Addr;
    fn legit(self, n: usize) -> Ipv4Addr;
}

impl Addresses for Setup {
    /// Its number in the clients' addresses and the messages' subjects.
    fn index(self) -> u8 {
        match self {
            Setup::Postfix => 1,
            Setup::Fail2ban => 2,
            Setup::Proxy => 3,
            Setup::Policy => 4,
            Setup::Postscreen => 5,
            Setup::Steer => 6,
        }
    }

    /// Where its clients connect.
    fn server(self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 98, 0, self.host()), 25)
    }

    /// Bot `n` (1-based) of delay group `d`: 10.98.<10*setup+d>.<n>.
    fn bot(self, d: usize, n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 98, self.index() * 10 + d as u8, n as u8)
    }

    /// Legitimate sender `n` (1-based): 10.98.<10*setup+9>.<n>.
    fn legit(self, n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 98, self.index() * 10 + 9, n as u8)
    }
}

/// A bot's run: when it forged, how the forged session and the return ended.
struct BotRun {
    ip: Ipv4Addr,
    delay: usize,
    /// Unix ms when the forged HELO went out.
    forged_at_ms: u64,
    forged: Ended,
    returned: Ended,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs the bots and the legitimate senders of one setup in the client namespace (one thread,
/// every session a task); returns the bots' runs and the legitimate senders' ends.
fn scenario(clients: &Netns, setup: Setup) -> (Vec<BotRun>, Vec<Ended>) {
    let server = SocketAddr::V4(setup.server());
    clients.enter(move || {
        client::runtime().block_on(async move {
            let slots = (DELAYS_MS.len() * BOTS) as u32;
            let mut bots = Vec::new();
            for n in 1..=BOTS {
                for (d, &delay_ms) in DELAYS_MS.iter().enumerate() {
                    let ip = setup.bot(d, n);
                    let start = STAGGER * (((n - 1) * DELAYS_MS.len() + d) as u32) / slots;
                    bots.push(tokio::spawn(async move {
                        tokio::time::sleep(start).await;
                        let forged_at_ms = unix_ms();
                        let forged = session(ip.into(), server, FORGED, "forged", BOUNDS).await;
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        let helo = format!("mail{n}.fresh-{d}.example.net");
                        let subject = format!("bot {} {delay_ms} {ip}", setup.index());
                        let returned = session(ip.into(), server, &helo, &subject, BOUNDS).await;
                        BotRun { ip, delay: d, forged_at_ms, forged, returned }
                    }));
                }
            }
            let span = STAGGER + Duration::from_millis(DELAYS_MS[DELAYS_MS.len() - 1]);
            let legit: Vec<_> = (1..=LEGIT)
                .map(|n| {
                    let ip = setup.legit(n);
                    let start = span * (n as u32) / (LEGIT as u32 + 1);
                    tokio::spawn(async move {
                        tokio::time::sleep(start).await;
                        let helo = legit_name(n);
                        let subject = format!("legit {} {ip}", setup.index());
                        session(ip.into(), server, &helo, &subject, BOUNDS).await
                    })
                })
                .collect();
            let mut runs = Vec::new();
            for bot in bots {
                runs.push(bot.await.expect("a bot task panicked"));
            }
            let mut ends = Vec::new();
            for sender in legit {
                ends.push(sender.await.expect("a sender task panicked"));
            }
            (runs, ends)
        })
    })
}

/// Legitimate sender `n`'s HELO, its name in dnsmasq's zone.
fn legit_name(n: usize) -> String {
    format!("mail.legit{n}.example.org")
}

/// dnsmasq's zones: each legitimate sender's name and address (forward-confirmed: A and PTR),
/// the bots' networks with no reverse names, their fresh HELOs with no address.
fn zones() -> String {
    let mut s = String::from("auth-zone=example.org,10.98.0.0/16\nauth-zone=example.net\n");
    for setup in SHOWN {
        for n in 1..=LEGIT {
            s.push_str(&format!("host-record={},{}\n", legit_name(n), setup.legit(n)));
        }
    }
    s
}

/// Unix ms of "YYYY-MM-DD?HH:MM:SS[.,]fff..." (UTC), as the agent's and fail2ban's logs start.
fn parse_time_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac: String = text[19..]
        .trim_start_matches(['.', ','])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let ms = format!("{frac:0<3}").get(..3)?.parse::<i64>().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60 + ss).ok().map(|s| s * 1000 + ms as u64)
}

/// Ban times by address from the agent's log (`... banned client=IP ...`).
fn agent_bans(log: &str) -> HashMap<Ipv4Addr, u64> {
    log.lines()
        .filter(|l| l.contains(" banned") && l.contains("client="))
        .filter_map(|l| {
            let ip = l.split("client=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((ip, parse_time_ms(l)?))
        })
        .collect()
}

/// Ban times by address from fail2ban's log (`... [postfix] Ban IP`).
fn fail2ban_bans(log: &str) -> HashMap<Ipv4Addr, u64> {
    log.lines()
        .filter_map(|l| {
            let ip = l.split("] Ban ").nth(1)?.trim().parse().ok()?;
            Some((ip, parse_time_ms(l)?))
        })
        .collect()
}

/// What one setup measured.
struct Outcome {
    setup: Setup,
    /// Per delay: spam delivered, bot sessions that reached an smtpd (forged + returning).
    delivered: [usize; 4],
    smtpd_sessions: [usize; 4],
    /// How the returns ended, per delay, for the notes.
    returns: [HashMap<String, usize>; 4],
    legit_delivered: usize,
    legit_sent: usize,
    mta_cpu: f64,
    filter_cpu: f64,
    /// Forged HELO to ban, ms: median and max over the bots banned; bots banned.
    ban_ms: Option<(f64, f64, usize)>,
    note: String,
}

/// The agent's config for the bench gateway: the admin's defaults, the forged names.
fn agent_config(pins: &PinDir, door: &str) -> PathBuf {
    crate::gateway::agent_config(
        pins,
        &format!(
            "domains = [\"={FORGED}\", \"=gw.test\"]\naddresses = [\"10.98.0.1\", \"10.98.0.3\", \"10.98.0.4\"]"
        ),
        door,
    )
}

fn run_setup(
    setup: Setup,
    gateway: &Netns,
    clients: &Netns,
    gw_if: &str,
    postfix: &Postfix,
    postfix_log: &Path,
) -> anyhow::Result<Outcome> {
    progress(&format!("bots: {}", setup.name()));
    let ns_id = ns_id_of(gateway);
    let pins = PinDir::new();
    let mut fail2ban = None;
    let mut agent = None;
    match setup {
        Setup::Postfix => {}
        Setup::Postscreen => anyhow::bail!("the bots section sets up no postscreen"),
        Setup::Steer => anyhow::bail!("the bots section sets up no steering"),
        Setup::Fail2ban => fail2ban = Some(Fail2ban::start(gateway, postfix_log)?),
        Setup::Proxy => {
            let config = agent_config(&pins, "");
            let control = pins.control_socket();
            let server = setup.server().to_string();
            let extra = ["--listen", &server, "--upstream", UPSTREAM];
            agent =
                Some(AgentProcess::run_in(gateway, &config, gw_if, "native", &extra, move || {
                    tests::control_answers(&control)
                }));
        }
        Setup::Policy => {
            let config = agent_config(
                &pins,
                &format!("[proxy]\nlisteners = []\n[policy]\nlisteners = [\"{POLICY}\"]\n"),
            );
            let name = gateway.name.clone();
            agent = Some(AgentProcess::run_in(gateway, &config, gw_if, "native", &[], move || {
                in_netns(&name, || TcpStream::connect(POLICY).is_ok())
            }));
        }
    }
    let delivered_before = postfix.delivered().len();
    let cpu_before = ns_processes(&ns_id);
    let (bots, legit) = scenario(clients, setup);
    // Let the queue settle: Postfix delivers what it took, through its capture pipe.
    let mut last = (postfix.delivered().len(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60);
    while last.1.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = postfix.delivered().len();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let cpu_after = ns_processes(&ns_id);
    let (mta_cpu, filter_cpu) = cpu_between(&cpu_before, &cpu_after);

    let subjects: Vec<String> = postfix.delivered()[delivered_before..]
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(m);
            text.lines().find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    let mut delivered = [0usize; 4];
    for (d, ms) in DELAYS_MS.iter().enumerate() {
        let prefix = format!("bot {} {ms} ", setup.index());
        delivered[d] = subjects.iter().filter(|s| s.starts_with(&prefix)).count();
    }
    let legit_prefix = format!("legit {} ", setup.index());
    let legit_delivered = subjects.iter().filter(|s| s.starts_with(&legit_prefix)).count();

    let log = postfix.log();
    let mut smtpd_sessions = [0usize; 4];
    for line in log.lines().filter(|l| l.contains("postfix/smtpd") && l.contains(": connect from"))
    {
        let Some(ip) = line
            .split('[')
            .nth(2)
            .and_then(|s| s.split(']').next())
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let [10, 98, third, _] = ip.octets() else { continue };
        if third / 10 == setup.index() && (third % 10) < 4 {
            smtpd_sessions[(third % 10) as usize] += 1;
        }
    }
    let mut returns: [HashMap<String, usize>; 4] = Default::default();
    for bot in &bots {
        *returns[bot.delay].entry(format!("{:?}", bot.returned)).or_default() += 1;
    }
    let bans = match (&fail2ban, &agent) {
        (Some(f2b), _) => fail2ban_bans(&f2b.log()),
        (_, Some(agent)) => agent_bans(&agent.log()),
        _ => HashMap::new(),
    };
    let mut ban_ms: Vec<f64> = bots
        .iter()
        .filter_map(|b| Some(bans.get(&b.ip)?.saturating_sub(b.forged_at_ms) as f64))
        .collect();
    let ban_ms = (!ban_ms.is_empty()).then(|| {
        let max = ban_ms.iter().copied().fold(0.0, f64::max);
        let n = ban_ms.len();
        (median(&mut ban_ms), max, n)
    });
    let forged_ends: Vec<String> = {
        let mut by: HashMap<String, usize> = HashMap::new();
        for bot in &bots {
            *by.entry(format!("{:?}", bot.forged)).or_default() += 1;
        }
        let mut v: Vec<String> = by.into_iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        v.sort();
        v
    };
    let note = format!("forged sessions ended: {}", forged_ends.join(", "));
    drop(agent);
    if matches!(setup, Setup::Proxy | Setup::Policy) {
        // The program stays attached when the agent exits: take it and the maps away.
        let _ = Command::new(tests::agent_bin())
            .arg("--pin-dir")
            .arg(pins.path())
            .args(["detach", "--maps"])
            .output();
    }
    drop(fail2ban);
    Ok(Outcome {
        setup,
        delivered,
        smtpd_sessions,
        returns,
        legit_delivered,
        legit_sent: legit.len(),
        mta_cpu,
        filter_cpu,
        ban_ms,
        note,
    })
}

pub fn run(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    let gateway = Netns::new("hfbg");
    let clients = Netns::new("hfbc");
    let (gw_if, cl_if) = veth(&gateway, &clients);
    gateway.ip(&["addr", "add", "10.98.0.1/16", "dev", &gw_if]);
    for last in [3, 4] {
        gateway.ip(&["addr", "add", &format!("10.98.0.{last}/32"), "dev", &gw_if]);
    }
    // Every bot and sender its own address on the client's veth.
    let mut batch = format!("addr add 10.98.0.2/16 dev {cl_if}\n");
    for setup in SHOWN {
        for d in 0..DELAYS_MS.len() {
            for n in 1..=BOTS {
                batch.push_str(&format!("addr add {}/32 dev {cl_if}\n", setup.bot(d, n)));
            }
        }
        for n in 1..=LEGIT {
            batch.push_str(&format!("addr add {}/32 dev {cl_if}\n", setup.legit(n)));
        }
    }
    let file = std::env::temp_dir().join(tests::unique("hf-bots-addrs-"));
    std::fs::write(&file, batch)?;
    clients.ip(&["-batch", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    // Room for the gateway's neighbour entries (one per client address).
    let _ = in_netns(&gateway.name, || {
        std::fs::write("/proc/sys/net/ipv4/neigh/default/gc_thresh3", "4096")
    });

    let table = std::env::temp_dir().join(tests::unique("hf-bots-helo-access-"));
    std::fs::write(
        &table,
        format!(
            "{FORGED} REJECT\ngw.test REJECT\n10.98.0.1 REJECT\n[10.98.0.1] REJECT\n\
             10.98.0.3 REJECT\n[10.98.0.3] REJECT\n10.98.0.4 REJECT\n[10.98.0.4] REJECT\n"
        ),
    )?;
    let _table_guard = RemoveFile(table.clone());
    let extra = format!(
        "smtpd_helo_required = yes\nsmtpd_delay_reject = yes\n\
         helo_recipe = check_helo_access texthash:{}\n\
         policy_restrictions = check_policy_service inet:{POLICY}, reject_unauth_destination\n\
         smtpd_policy_service_default_action = DUNNO\n",
        table.display()
    );
    let services = format!(
        "{} inet n - n - - smtpd\n  -o smtpd_helo_restrictions=$helo_recipe\n\
         {} inet n - n - - smtpd\n  -o smtpd_recipient_restrictions=$policy_restrictions\n",
        Setup::Postfix.server(),
        Setup::Policy.server()
    );
    // The agent's DNS checks ask dnsmasq in the gateway namespace, never the machine's resolver.
    let _dnsmasq = Dnsmasq::start(&gateway, &zones(), false)?;
    progress("bots: starting a private Postfix");
    let postfix = Postfix::start(&gateway, "bench-bots", &extra, &services);
    let postfix_log = postfix.log_path();

    let mut outcomes = Vec::new();
    for setup in RUN_ORDER {
        match run_setup(setup, &gateway, &clients, &gw_if, &postfix, &postfix_log) {
            Ok(outcome) => {
                progress(&format!(
                    "bots: {}: spam delivered {:?} of {BOTS} each, legit {}/{}",
                    setup.name(),
                    outcome.delivered,
                    outcome.legit_delivered,
                    outcome.legit_sent
                ));
                outcomes.push(outcome);
            }
            Err(error) => return Err(error.context(format!("setup {}", setup.name()))),
        }
    }
    outcomes.sort_by_key(|o| o.setup.index());
    write_report(report, out, &outcomes)?;
    drop(postfix);
    Ok(())
}

fn delay_label(ms: u64) -> String {
    if ms >= 1000 { format!("{} s", ms / 1000) } else { format!("{ms} ms") }
}

fn write_report(report: &mut Report, out: &Path, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for o in outcomes {
        for (d, ms) in DELAYS_MS.iter().enumerate() {
            let mut ends: Vec<String> =
                o.returns[d].iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            ends.sort();
            rows.push(vec![
                o.setup.name().to_owned(),
                delay_label(*ms),
                format!("{} / {BOTS}", o.delivered[d]),
                o.smtpd_sessions[d].to_string(),
                ends.join(", "),
            ]);
        }
    }
    let per_setup: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.setup.name().to_owned(),
                format!("{} / {}", o.legit_delivered, o.legit_sent),
                o.smtpd_sessions.iter().sum::<usize>().to_string(),
                f(o.mta_cpu, 2),
                f(o.mta_cpu + o.filter_cpu, 2),
                match o.ban_ms {
                    Some((median, max, n)) => format!("{median:.0} ms (max {max:.0}, {n} bans)"),
                    None => "no ban".into(),
                },
            ]
        })
        .collect();
    let notes: Vec<String> =
        outcomes.iter().map(|o| format!("{}: {}.", o.setup.name(), o.note)).collect();
    report.section(
        "8. Returning bots",
        &format!(
            "Two namespaces joined by a veth. {BOTS} bots per return delay and setup ({} bot \
             addresses a setup, each its own address on the client veth) open a session with a \
             forged HELO (`{FORGED}`, the gateway's own name), are refused, and come back after \
             {} with a fresh, valid-looking HELO to deliver a message; {LEGIT} legitimate senders \
             (their own addresses) deliver one message each alongside. Bots start spread over {} s. \
             A return connection unanswered in {} s counts as dropped. One private Postfix 3.7 \
             serves every setup on its own address: (1) `smtpd_helo_restrictions = \
             check_helo_access` with its own names and addresses, `smtpd_delay_reject = yes`; \
             (2) the same with Debian's fail2ban 1.0 (its `postfix` jail, `maxretry = 1`, \
             `bantime = 1h`, `nftables-multiport`, `backend = polling` on Postfix's \
             `maillog_file` since there is no syslog here; one failregex line added for \
             check_helo_access's `Helo command rejected: Access denied`, which Debian's filter \
             does not match), started with `fail2ban-client -c DIR -b start` in the gateway \
             namespace; (3) helo-agent's proxy in front of Postfix (own greeting, PROXY v2, XDP \
             native on the gateway veth, the defaults an admin keeps otherwise: 1 h bans, 100 \
             bans/s, the pregreet test with its 6 s wait for a new client's greeting, the DNS \
             checks in `log`); (4) helo-agent's policy service in Postfix's \
             `smtpd_recipient_restrictions` (XDP native too). The agent's DNS checks ask a \
             dnsmasq in the gateway namespace, authoritative for the senders' zones (each \
             legitimate sender's name and address forward-confirmed, the bots with no reverse \
             name and fresh HELOs that do not resolve), never the machine's resolver. Delivered counts what Postfix's capture pipe received. smtpd sessions: \
             `connect from` lines for the bots' addresses in Postfix's log (forged and returning \
             sessions). CPU: utime+stime of the gateway namespace's processes from the \
             scenario's start until the queue settled (the MTA: Postfix's; gateway: Postfix's and \
             the filter daemon's; kernel softirq work and processes that ended in between, such \
             as the pipe's shell, are not seen), on a 2-core machine shared with other work, so \
             only large differences mean anything. Time to ban: from the forged HELO to the ban \
             in the filter's log (fail2ban's `Ban`, the agent's `banned`). Plot: \
             `bots_delivered.png`.",
            DELAYS_MS.len() * BOTS,
            DELAYS_MS.iter().map(|ms| delay_label(*ms)).collect::<Vec<_>>().join(", "),
            STAGGER.as_secs(),
            BOUNDS.connect.as_secs()
        ),
        &["setup", "return after", "bots' spam delivered", "bot sessions in smtpd", "returns ended"],
        &rows,
        &[],
    );
    report.table(
        &[
            "setup",
            "legitimate delivered",
            "bot sessions in smtpd",
            "MTA CPU s",
            "gateway CPU s",
            "forged HELO to ban",
        ],
        &per_setup,
        &notes,
    );
    let proxy_or_policy: Vec<&Outcome> =
        outcomes.iter().filter(|o| matches!(o.setup, Setup::Proxy | Setup::Policy)).collect();
    let none_delivered = proxy_or_policy.iter().all(|o| o.delivered.iter().all(|n| *n == 0));
    let legit_all = outcomes.iter().all(|o| o.legit_delivered == o.legit_sent);
    report.target(
        "returning bots: helo-filter delivers none, at any delay (0 ms included), legitimate all",
        none_delivered && legit_all && proxy_or_policy.len() == 2,
        proxy_or_policy
            .iter()
            .map(|o| {
                format!(
                    "{}: {} of {}",
                    o.setup.name(),
                    o.delivered.iter().sum::<usize>(),
                    DELAYS_MS.len() * BOTS
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
            + &format!("; legitimate {}", if legit_all { "all delivered" } else { "LOST" }),
    );
    if let Some(proxy) = outcomes.iter().find(|o| o.setup == Setup::Proxy) {
        let returning_in_mta = proxy.smtpd_sessions.iter().sum::<usize>();
        report.target(
            "returning bots: the MTA spends nothing on bots behind helo-filter's proxy",
            returning_in_mta == 0,
            format!("{returning_in_mta} bot sessions reached smtpd"),
        );
    }
    let groups: Vec<String> = DELAYS_MS.iter().map(|ms| delay_label(*ms)).collect();
    let series: Vec<(String, Vec<f64>)> = outcomes
        .iter()
        .map(|o| (o.setup.name().to_owned(), o.delivered.iter().map(|n| *n as f64).collect()))
        .collect();
    crate::plot::bars(
        &out.join("bots_delivered.png"),
        &format!("Returning bots' spam delivered, of {BOTS} per delay (lower is better)"),
        "messages delivered",
        &groups,
        &series,
    )?;
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn log_times_parse_as_utc() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:01.250000Z  INFO x"), Some(1250));
        assert_eq!(parse_time_ms("2000-03-01 00:00:00,007 fail2ban"), Some(951_868_800_007));
        let bans = fail2ban_bans(
            "2026-12-01 23:52:13,123 fail2ban.actions [9]: NOTICE  [postfix] Ban 10.98.21.5\n",
        );
        assert_eq!(bans.len(), 1);
        let agent = agent_bans(
            "2026-12-01T23:52:13.123456Z  INFO helo_agent::blocklist::worker: banned client=10.98.31.2 ttl=1h\n",
        );
        assert_eq!(agent.get(&Ipv4Addr::new(10, 98, 31, 2)), bans.values().next());
    }
}
