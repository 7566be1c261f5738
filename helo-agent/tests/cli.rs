//! The binary as an admin meets it, no root needed: bad input gets a clear message and a
//! non-zero exit, never a panic; `check` and `check-config` answer.

use std::process::{Command, Output};

/// `helo-agent ARGS`, with `--no-config` unless ARGS name a config: an installed
/// /etc/helo-filter/helo-filter.toml is every command's default, and not this test's.
fn agent(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_helo-agent"));
    if !args.iter().any(|a| a.starts_with("--config")) {
        command.arg("--no-config");
    }
    command
        .args(["--pin-dir", "/nonexistent/helo-cli-test"])
        .args(args)
        .env_remove("HELO_FILTER_CONFIG")
        .output()
        .expect("helo-agent runs")
}

/// Runs `args`, expects failure with `message` on stderr, and no panic.
fn fails_with(args: &[&str], message: &str) {
    let out = agent(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} exits 1:\n{stderr}");
    assert!(stderr.starts_with("helo-agent: error: "), "{args:?}: {stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn bad_input_gets_a_clear_message_and_exit_1() {
    fails_with(&["ban", "not-an-ip"], "is not an IP address or CIDR");
    fails_with(&["ban", "192.0.2.1", "--ttl", "30"], "write it as 30s, 30m, 30h or 30d");
    fails_with(&["ban", "192.0.2.1", "--ttl", "0s"], "--ttl must be longer than 0s");
    fails_with(&["ban", "192.0.2.0/16"], "allowlist it instead");
    fails_with(&["ban", "127.0.0.1"], "is in the allowlisted network 127.0.0.0/8");
    fails_with(&["ban", "192.0.2.1", "--prefix"], "--prefix widens an IPv6 address to its /64");
    fails_with(&["list"], "no pinned helo-filter maps in /nonexistent/helo-cli-test");
    fails_with(&["--config", "/nonexistent/helo.toml", "check", "x"], "cannot read config file");
}

#[test]
fn check_explains_a_verdict_as_json() {
    let out = agent(&["check", "localhost", "--client", "203.0.113.9", "--json"]);
    assert_eq!(out.status.code(), Some(4), "a ban verdict exits 4");
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["verdict"], "ban");
    assert_eq!(verdict["rule"], "localhost");
    assert_eq!(verdict["helo"], "localhost");
    assert_eq!(verdict["ttl"], 3600);
}

#[test]
fn check_config_validates_without_running() {
    let dir = std::env::temp_dir().join(format!("helo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[rules]\ndomains = [\"=spam.example\"]\nregexes = ['^dsl-']\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[rules]\nregexes = ['(open']\n").unwrap();
    let out = agent(&["check-config", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("config ok:") && stdout.contains("1 domain table entries, 1 regex rules"),
        "{stdout}"
    );
    fails_with(&["check-config", bad.to_str().unwrap()], "config rules.regexes:1: bad regex");
    let defaults = agent(&["check-config"]);
    let defaults = String::from_utf8_lossy(&defaults.stdout);
    assert!(defaults.contains("config ok: <embedded defaults>"), "{defaults}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        defaults.contains(&format!(" {cpus} session threads (one per CPU here)")),
        "{defaults}"
    );
    // The fleet is shown, never its password.
    let fleet = dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        "[fleet]\nredis = \"redis://:s3cret@10.0.0.5:6379/0\"\nnode = \"mx1\"\n",
    )
    .unwrap();
    let out = agent(&["check-config", fleet.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fleet: node mx1 through redis://:***@10.0.0.5:6379/0"), "{stdout}");
    assert!(!stdout.contains("s3cret"), "{stdout}");
    std::fs::write(&fleet, "[fleet]\nredis = \"redis://:s3cret@10.0.0.5:port/0\"\n").unwrap();
    let out = agent(&["check-config", fleet.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("fleet.redis"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "never the password: {stderr}");
    // Steering says where strangers go, and a set-up that would loop is refused with the fix.
    let steer = dir.join("steer.toml");
    let sockets = "[[proxy.listeners]]\naddress = \"127.0.0.1:2525\"\n";
    std::fs::write(&steer, format!("[steer]\naddresses = [\"203.0.113.5:25\"]\n{sockets}"))
        .unwrap();
    let out = agent(&["check-config", steer.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("steering: 203.0.113.5:25 to the agent's sockets 127.0.0.1:2525")
            && stdout.contains("passes for 1d"),
        "{stdout}"
    );
    std::fs::write(&steer, "[steer]\naddresses = [\"203.0.113.5:25\"]\n").unwrap();
    fails_with(&["check-config", steer.to_str().unwrap()], "covers the steered endpoint");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `ban --ttl 99999w` printed "for 699993d" and then listed as forever (the expiry saturated
/// the kernel's clock), and a `--reason` over 64 bytes was cut without a word. Both are refused
/// now, with the limit and what to do; the limits themselves are accepted (the ban then fails
/// only for want of pinned maps).
#[test]
fn a_ttl_past_the_longest_ban_and_an_over_long_reason_are_refused() {
    fails_with(
        &["ban", "192.0.2.1", "--ttl", "99999w"],
        "--ttl 99999w is longer than the longest ban, 3650d (about ten years): use --ttl forever",
    );
    fails_with(&["ban", "192.0.2.1", "--ttl", "3650d1s"], "longer than the longest ban");
    fails_with(&["ban", "192.0.2.1", "--ttl", "3650d"], "no pinned helo-filter maps");
    fails_with(
        &["ban", "192.0.2.1", "--reason", &"x".repeat(65)],
        "--reason is 65 bytes long; a ban keeps at most 64: shorten it",
    );
    fails_with(&["ban", "192.0.2.1", "--reason", &"é".repeat(33)], "--reason is 66 bytes long");
    fails_with(&["ban", "192.0.2.1", "--reason", &"x".repeat(64)], "no pinned helo-filter maps");
}

/// The limits of `ban` and what `unban` also forgets are in `--help`.
#[test]
fn help_states_the_ban_limits_and_that_unban_forgets_the_offence_history() {
    let help = |command: &str| {
        let out = agent(&[command, "--help"]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let ban = help("ban");
    assert!(ban.contains("at most 3650d"), "{ban}");
    assert!(ban.contains("at most 64 bytes"), "{ban}");
    let unban = help("unban");
    assert!(unban.contains("forgets the address's offence history"), "{unban}");
}

/// A directory of its own for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("helo-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `check` exited 0 whatever the verdict; scripts want the verdict in the exit status, as
/// `postmap -q` gives it.
#[test]
fn check_answers_by_its_exit_status() {
    let code = |args: &[&str]| agent(args).status.code();
    assert_eq!(code(&["check", "mail.example.org", "--client", "203.0.113.9"]), Some(0), "pass");
    assert_eq!(code(&["check", "nodot", "--client", "203.0.113.9"]), Some(3), "reject");
    assert_eq!(code(&["check", "nodot", "--json"]), Some(3), "reject, in JSON too");
    assert_eq!(code(&["check", "localhost"]), Some(4), "ban");
    assert_eq!(code(&["check", "[203.0.113.9]", "--client", "203.0.113.9"]), Some(0));
    assert_eq!(code(&["--config", "/nonexistent/helo.toml", "check", "x"]), Some(1), "error");
    assert_eq!(code(&["check"]), Some(2), "usage: no HELO");
    assert_eq!(code(&["check", "x", "--client", "not-an-ip"]), Some(2), "usage");
    let help = String::from_utf8(agent(&["check", "--help"]).stdout).unwrap();
    for line in ["0  pass", "3  reject", "4  ban", "1  error", "2  usage"] {
        assert!(help.contains(line), "{line:?} in check --help:\n{help}");
    }
}

/// `check-config` stopped at the first bad regex.
#[test]
fn check_config_lists_every_bad_entry() {
    let dir = scratch("bad-entries");
    let badhelo = dir.join("badhelo");
    std::fs::write(&badhelo, "^ok\n(open\nfine\n[unclosed\n").unwrap();
    let config = dir.join("helo.toml");
    std::fs::write(
        &config,
        format!(
            "[rules]\nregexes = ['a{{2,1}}']\nbadhelo_file = {:?}\n",
            badhelo.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = agent(&["check-config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 bad rule entries"), "{stderr}");
    for entry in [
        "config rules.regexes:1: bad regex \"a{2,1}\"".to_owned(),
        format!("{}:2: bad regex \"(open\": unclosed group", badhelo.display()),
        format!("{}:4: bad regex \"[unclosed\": unclosed character class", badhelo.display()),
    ] {
        assert!(stderr.contains(&entry), "{entry:?} in:\n{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Errors printed their OS error twice: `cannot listen on ...: Address already in use (os error
/// 98): Address already in use (os error 98)`.
#[test]
fn an_os_error_is_printed_once() {
    let dir = scratch("os-error");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = dir.join("helo.toml");
    let socket = dir.join("control.sock");
    std::fs::write(&config, format!("[agent]\ncontrol_socket = {:?}\n", socket.to_str().unwrap()))
        .unwrap();
    // `run` binds its listeners before it loads or attaches anything: a port in use stops it.
    let listen = format!("127.0.0.1:{port}");
    let config = config.to_str().unwrap();
    let out = agent(&["--config", config, "run", "--iface", "lo", "--listen", &listen]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("helo-agent: error: cannot listen on {listen}")), "{stderr}");
    assert_eq!(stderr.matches("(os error 98)").count(), 1, "{stderr}");

    let missing = dir.join("helo-missing.toml");
    std::fs::write(&missing, "[rules]\nbadhelo_file = \"/nonexistent/badhelo\"\n").unwrap();
    let out = agent(&["check-config", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read rules.badhelo_file file /nonexistent/badhelo"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `helo-agent reload` of a config that does not validate stopped in the CLI, at its own copy of
/// the error: the agent never heard of it, so no log line and no `reloads_total{result=
/// "refused"}`, while SIGHUP had both. The request must reach the agent, which refuses it.
#[test]
fn reload_of_a_bad_config_reaches_the_agent() {
    use std::io::{BufRead as _, Write as _};
    let dir = scratch("reload");
    let socket = dir.join("control.sock");
    let config = dir.join("helo.toml");
    std::fs::write(
        &config,
        format!("bogus = 1\n[agent]\ncontrol_socket = {:?}\n", socket.to_str().unwrap()),
    )
    .unwrap();
    // A stand-in for the agent: takes one request, refuses it as the agent does.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stand_in = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(_) => return None,
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut request = String::new();
        std::io::BufReader::new(&stream).read_line(&mut request).unwrap();
        stream
            .write_all(
                b"{\"ok\":false,\"error\":\"reload refused, the config in force keeps running: unknown field `bogus`\"}\n",
            )
            .unwrap();
        Some(request)
    });
    let out = agent(&["--config", config.to_str().unwrap(), "reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let request = stand_in.join().unwrap();
    let request = request.unwrap_or_else(|| panic!("the agent was never asked:\n{stderr}"));
    assert!(request.contains("\"command\":\"reload\""), "{request}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reload refused, the config in force keeps running"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 27: `helo-agent reload` with a config that does not even parse read the control
/// socket leniently, fell back to the default one and could talk to another agent. It stops
/// with the parse error, asking no agent.
#[test]
fn reload_of_a_config_that_does_not_parse_asks_no_agent() {
    let dir = scratch("reload-unparsed");
    let config = dir.join("helo.toml");
    std::fs::write(&config, "[agent\ncontrol_socket = \"/run/other/control.sock\"\n").unwrap();
    let out = agent(&["--config", config.to_str().unwrap(), "reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("config file {}", config.display())), "{stderr}");
    assert!(!stderr.contains("answered"), "no agent asked: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 30: `--no-config` asks for the embedded defaults, and `check-config` says so; it
/// cannot be given with `--config`; HELO_FILTER_CONFIG names a config like `--config`.
#[test]
fn no_config_asks_for_the_embedded_defaults() {
    let out = agent(&["check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("config ok: <embedded defaults>"), "{stdout}");
    let both = agent(&["--config", "/nonexistent.toml", "--no-config", "check-config"]);
    assert_eq!(both.status.code(), Some(2), "a usage error");
    let dir = scratch("env-config");
    let config = dir.join("helo.toml");
    std::fs::write(&config, "[identity]\ndetect = false\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_helo-agent"))
        .arg("check-config")
        .env("HELO_FILTER_CONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("config ok: {}", config.display())), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_helo-agent"))
        .args(["--no-config", "check-config"])
        .env("HELO_FILTER_CONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("config ok: <embedded defaults>"), "--no-config wins: {stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Port 465 is implicit TLS: a listener there could never read a HELO.
#[test]
fn listening_on_the_smtps_port_is_refused() {
    let out = agent(&["run", "--listen", "0.0.0.0:465"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("port 465 is SMTPS"), "{stderr}");
}

/// A relative `--pin-dir` skipped the absolute-path check that `xdp.pin_dir` gets in a config
/// file: command-line overrides were applied after validation. They are applied to the file's
/// values before it now, so the flag is refused like the key, by its name.
#[test]
fn a_relative_pin_dir_is_refused_like_one_in_the_config() {
    for command in ["list", "stats", "reload"] {
        let out = Command::new(env!("CARGO_BIN_EXE_helo-agent"))
            .args(["--pin-dir", "relative/pins", command])
            .env_remove("HELO_FILTER_CONFIG")
            .output()
            .expect("helo-agent runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains("--pin-dir: must be an absolute path under a bpffs"),
            "{command}: {stderr}"
        );
    }
}

/// `--pregreeted` judges a client that spoke before the greeting was complete, as the proxy
/// greeting itself would; where the agent never runs that test (the MTA greets), `check` says
/// so and judges without it.
#[test]
fn check_judges_a_pregreeter_only_where_the_proxy_greets_itself() {
    let dir = scratch("pregreet");
    let config = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let json = |out: &Output| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();

    let out = agent(&["check", "mail.example.org", "--pregreeted", "--json"]);
    assert_eq!(out.status.code(), Some(0), "log by default");
    assert_eq!(json(&out)["logged"][0]["rule"], "pregreet");

    let reject = config("reject.toml", "[checks]\npregreet = \"reject\"\n");
    let out = agent(&["--config", &reject, "check", "mail.example.org", "--pregreeted", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let verdict = json(&out);
    assert_eq!(verdict["rule"], "pregreet");
    assert_eq!(verdict["reply"], serde_json::json!({"code": 550, "text": "5.5.1 Protocol error"}));
    let out = agent(&["--config", &reject, "check", "mail.example.org"]);
    assert_eq!(out.status.code(), Some(0), "a patient client");

    let mta = config("mta.toml", "[checks]\npregreet = \"reject\"\n[proxy]\ngreeting = \"mta\"\n");
    let out = agent(&["--config", &mta, "check", "mail.example.org", "--pregreeted"]);
    assert_eq!(out.status.code(), Some(0), "the MTA greets: no pregreet test, no pregreeter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--pregreeted ignored") && stderr.contains("\"own\""), "{stderr}");
    let help = String::from_utf8(agent(&["check", "--help"]).stdout).unwrap();
    assert!(help.contains("--pregreeted"), "{help}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check` keeps no HELO reuse count: it says so, and `--networks N` judges as if N client
/// networks had used the name. `tophelos --suggest` needs the running agent and is no JSON.
#[test]
fn check_judges_helo_reuse_from_the_count_it_is_given() {
    let dir = scratch("reuse");
    let path = dir.join("reuse.toml");
    let socket = dir.join("control.sock");
    std::fs::write(
        &path,
        format!(
            "[checks]\nhelo_reuse = \"reject\"\n[agent]\ncontrol_socket = {:?}\n",
            socket.display()
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let check = |extra: &[&str]| {
        let args = [&["--config", config, "check", "bulk.sender.example", "--no-dns"], extra];
        agent(&args.concat())
    };
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();

    let out = check(&["--client", "198.51.100.7"]);
    assert_eq!(out.status.code(), Some(0), "no count, no reuse verdict");
    assert!(stdout(&out).contains("reuse: not judged: check keeps no count"), "{}", stdout(&out));
    let out = check(&["--client", "198.51.100.7", "--networks", "19"]);
    assert_eq!(out.status.code(), Some(0), "below reuse.clients");
    assert!(stdout(&out).contains("reuse: 19 client networks in the last 1h"), "{}", stdout(&out));
    let out = check(&["--client", "198.51.100.7", "--networks", "23"]);
    assert_eq!(out.status.code(), Some(3), "reused: rejected");
    let text = stdout(&out);
    assert!(text.contains("rule:    helo_reuse"), "{text}");
    assert!(
        text.contains(
            "reason:  HELO bulk.sender.example used by 23 client networks in the last 1h"
        ),
        "{text}"
    );
    let out = check(&["--networks", "23", "--json"]);
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (verdict["rule"].as_str(), verdict["networks"].as_u64()),
        (Some("helo_reuse"), Some(23))
    );
    let literal = agent(&[
        "--config",
        config,
        "check",
        "[198.51.100.7]",
        "--client",
        "198.51.100.7",
        "--networks",
        "99",
    ]);
    assert_eq!(literal.status.code(), Some(0), "an address literal is never reuse");
    assert!(stdout(&literal).contains("never counted: not a domain name"), "{}", stdout(&literal));

    fails_with(&["--config", config, "tophelos", "--suggest"], "no agent is running at");
    let both = agent(&["--config", config, "tophelos", "--suggest", "--json"]);
    assert_eq!(both.status.code(), Some(2), "--suggest prints badhelo lines, not JSON");
    let help = String::from_utf8(agent(&["tophelos", "--help"]).stdout).unwrap();
    assert!(help.contains("--suggest") && help.contains("Nothing is applied"), "{help}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--networks` counts this client's network: 0 is no count `check` could be given (a usage
/// error, exit 2). Where the check cannot judge the HELO (it is off, or another rule decided
/// first) a `--networks` given is answered with why, never silently ignored.
#[test]
fn check_networks_is_at_least_1_and_never_silently_ignored() {
    let dir = scratch("reuse-networks");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let on = write("on.toml", "[checks]\nhelo_reuse = \"reject\"\n");
    let off = write("off.toml", "[checks]\nhelo_reuse = \"off\"\n");
    let check = |config: &str, helo: &str, networks: &str| {
        agent(&[
            "--config",
            config,
            "check",
            helo,
            "--no-dns",
            "--client",
            "198.51.100.7",
            "--networks",
            networks,
        ])
    };
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();

    let zero = check(&on, "bulk.sender.example", "0");
    assert_eq!(zero.status.code(), Some(2), "0 networks: a usage error");
    let stderr = String::from_utf8_lossy(&zero.stderr);
    assert!(stderr.contains("--networks"), "{stderr}");
    assert_eq!(check(&on, "bulk.sender.example", "1").status.code(), Some(0));

    let out = check(&off, "bulk.sender.example", "50");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out)
            .contains("reuse: not judged: checks.helo_reuse is \"off\" (--networks ignored)"),
        "{}",
        stdout(&out)
    );
    let out = check(&on, "friend", "50");
    assert_eq!(out.status.code(), Some(3), "no_dot rejects it first");
    assert!(
        stdout(&out)
            .contains("reuse: never counted: rule no_dot decided first (--networks ignored)"),
        "{}",
        stdout(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
