//! Config snippets in, validated values or errors naming the key and the fix out.

use super::*;
use crate::rules::{Check, CheckAction, RejectAt};

fn host() -> HostFacts {
    HostFacts {
        hostname: Some("mx1.example.com".into()),
        mailname: Some("example.com".into()),
        addresses: vec!["192.0.2.25".parse().unwrap(), "fe80::1".parse().unwrap()],
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"), &host())
}

#[test]
fn the_example_file_is_exactly_the_defaults() {
    let example = parse_raw(EXAMPLE, Path::new("example")).expect("the example config parses");
    assert_eq!(example, RawConfig::default());
}

#[test]
fn empty_file_means_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config.xdp.ports, vec![25, 465, 587]);
    assert_eq!(config.rules.ban_ttl, Duration::from_secs(3600));
    assert_eq!(config.xdp.mode, AttachMode::Auto);
    assert_eq!(config.xdp.pin_dir, PathBuf::from("/sys/fs/bpf/helo-filter"));
    assert_eq!(config.rules.reject_at, RejectAt::Rcpt);
    assert_eq!(config.reject_message, "sorry, your HELO host name has been denied");
    assert_eq!(config.rules.action(Check::ForgedIdentity), CheckAction::Ban);
    assert_eq!(config.rules.action(Check::Dynamic), CheckAction::Reject);
    assert_eq!(config.rules.action(Check::UnknownHelo), CheckAction::Log);
    assert_eq!(config.rules.action(Check::Impersonation), CheckAction::Ban);
    assert!(config.rules.trust);
}

#[test]
fn values_are_read() {
    let config = parse(
        r#"
        [xdp]
        interface = "eth1"
        mode = "skb"
        ports = [2525, 25, 25]
        [bans]
        default_ttl = "2d"
        [allowlist]
        networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
        [checks]
        no_dot = "off"
        dynamic = "ban"
        [reject]
        at = "helo"
        message = "go away"
        "#,
    )
    .unwrap();
    assert_eq!(config.xdp.interface.as_deref(), Some("eth1"));
    assert_eq!(config.xdp.mode, AttachMode::Skb);
    assert_eq!(config.xdp.ports, vec![25, 2525]);
    assert_eq!(config.rules.ban_ttl, Duration::from_secs(172_800));
    assert_eq!(config.rules.allowlist.len(), 3);
    assert_eq!(config.rules.allowlist[2].to_string(), "192.0.2.7/32");
    assert_eq!(config.rules.action(Check::NoDot), CheckAction::Off);
    assert_eq!(config.rules.action(Check::Dynamic), CheckAction::Ban);
    assert_eq!(config.rules.reject_at, RejectAt::Helo);
    assert_eq!(config.reject_message, "go away");
}

#[test]
fn identity_is_configured_and_detected() {
    let config = parse("[identity]\ndomains = [\"example.org\", \"=gw.example.net\"]\naddresses = [\"198.51.100.25\"]").unwrap();
    let names = &config.rules.identity.names;
    for name in ["example.org", "a.example.org", "gw.example.net", "mx1.example.com", "example.com"]
    {
        assert!(names.lookup(name).is_some(), "{name}");
    }
    for name in ["x.gw.example.net", "a.mx1.example.com", "sub.example.com"] {
        assert!(names.lookup(name).is_none(), "detected and = names cover that name only: {name}");
    }
    let addrs = &config.rules.identity.addresses;
    assert!(addrs.contains(&"198.51.100.25".parse().unwrap()));
    assert!(addrs.contains(&"192.0.2.25".parse().unwrap()));
    assert!(!addrs.contains(&"fe80::1".parse().unwrap()), "link-local is nobody's identity");

    let off = parse("[identity]\ndetect = false").unwrap();
    assert!(off.rules.identity.names.is_empty());
    assert!(off.rules.identity.addresses.is_empty());
}

#[test]
fn rule_files_are_imported_with_their_locations() {
    let dir = std::env::temp_dir().join(format!("helo-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let badhelo = dir.join("badhelo");
    let access = dir.join("helo_access");
    std::fs::write(&badhelo, "# comment\n^dsl-\n!\\.\n").unwrap();
    std::fs::write(&access, "example.net REJECT\n.example.org OK\n").unwrap();
    let text = format!(
        "[rules]\nbadhelo_file = {:?}\naccess_file = {:?}\nregexes = [\"^spam\"]\ndomains = [\"=bad.example\"]\n",
        badhelo.display().to_string(),
        access.display().to_string()
    );
    let config = parse(&text).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(config.rules.badhelo.len(), 3);
    assert_eq!(config.rules.table.len(), 2, "the .example.org line is skipped");
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("helo_access:2"), "{:?}", config.warnings);
}

/// `bans.max_per_second` dropped a storm's bans (issue 29) and is gone; a config that still
/// sets it loads, with a warning that says to remove it.
#[test]
fn the_retired_ban_rate_cap_loads_with_a_warning() {
    let config = parse("[bans]\nmax_per_second = 100\n").unwrap();
    assert!(
        config.warnings.iter().any(|w| w.contains("bans.max_per_second is no longer used")),
        "{:?}",
        config.warnings
    );
    assert!(!parse("").unwrap().warnings.iter().any(|w| w.contains("max_per_second")));
}

/// Issue 27: a rule's ban covers the client's IPv6 /64 by default, its IPv4 address alone; each
/// family's length may be set within its bounds, edges included.
#[test]
fn ban_prefix_lengths_default_to_the_v6_64_and_take_their_bounds() {
    use crate::addr::BanScope;
    assert_eq!(parse("").unwrap().scope, BanScope { v4: 32, v6: 64 });
    for (v4, v6) in [(24, 48), (32, 128), (28, 56)] {
        let text = format!("[bans]\nprefix_v4 = {v4}\nprefix_v6 = {v6}");
        assert_eq!(parse(&text).unwrap().scope, BanScope { v4, v6 }, "{text}");
    }
}

#[test]
fn unknown_keys_are_refused_with_the_line() {
    let err = parse("[xdp]\nport = [25]\n").unwrap_err().to_string();
    assert!(err.contains("test.toml"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("unknown field `port`"), "{err}");
    let err = parse("[checks]\nno_dots = \"off\"\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `no_dots`"), "{err}");
}

#[test]
fn bad_values_name_the_key_and_the_fix() {
    let cases = [
        ("[xdp]\nports = []", "xdp.ports"),
        ("[xdp]\nports = [0]", "xdp.ports"),
        ("[xdp]\nmax_bans_v4 = 1", "xdp.max_bans_v4"),
        ("[xdp]\npin_dir = \"relative\"", "xdp.pin_dir"),
        ("[xdp]\ninterface = \"\"", "xdp.interface"),
        ("[bans]\ndefault_ttl = \"60\"", "60s"),
        ("[bans]\ndefault_ttl = \"0s\"", "bans.default_ttl"),
        ("[allowlist]\nnetworks = [\"10.0.0.1/8\"]", "did you mean 10.0.0.0/8"),
        ("[allowlist]\nnetworks = [\"example.com\"]", "allowlist.networks"),
        ("[identity]\ndomains = [\"bad_name.example\"]", "identity.domains"),
        ("[identity]\naddresses = [\"mx.example.com\"]", "identity.addresses"),
        ("[rules]\ndomains = [\"..x\"]", "rules.domains"),
        ("[rules]\nregexes = [\"(open\"]", "config rules.regexes:1: bad regex"),
        ("[rules]\nbadhelo_file = \"/nonexistent/badhelo\"", "cannot read rules.badhelo_file file"),
        ("[reject]\nmessage = \"two\\nlines\"", "reject.message"),
        ("[bans]\nmax_ttl = \"forever\"", "bans.max_ttl"),
        ("[bans]\nescalation_factor = 0", "bans.escalation_factor"),
        ("[bans]\nprefix_v4 = 23", "bans.prefix_v4: /23 is outside /24 to /32"),
        ("[bans]\nprefix_v4 = 33", "bans.prefix_v4: /33 is outside"),
        ("[bans]\nprefix_v6 = 47", "bans.prefix_v6: /47 is outside /48 to /128"),
        ("[bans]\nprefix_v6 = 129", "bans.prefix_v6: /129 is outside"),
        ("[xdp]\nmax_bans_v6_prefix = 0", "xdp.max_bans_v6_prefix"),
        ("[proxy]\nupstream = \"localhost\"", "proxy.upstream"),
        ("[proxy]\nlisteners = []", "proxy.listeners"),
        ("[[proxy.listeners]]\naddress = \"25\"", "proxy.listeners.address"),
        ("[proxy]\nhelo_timeout = \"0s\"", "proxy.helo_timeout"),
        ("[proxy]\nmax_sessions_per_ip = 0", "proxy.max_sessions"),
        ("[proxy]\nworkers = 257", "proxy.workers"),
        ("[bans]\nsnapshot = \"/tmp/bans.json\"", "/tmp is a shared directory"),
        ("[bans]\nsnapshot = \"/bans.json\"", "/ is a shared directory"),
        ("[bans]\nsnapshot = \"bans.json\"", "bans.snapshot"),
        ("[agent]\ncontrol_socket = \"control.sock\"", "agent.control_socket"),
        ("[agent]\nmetrics = \"9125\"", "agent.metrics"),
        ("[proxy]\ntrusted_proxies = [\"lb.example\"]", "proxy.trusted_proxies"),
        ("[proxy]\nhostname = \"two words\"", "proxy.hostname"),
        ("[fleet]\nredis = \"localhost:6379\"", "is not a Redis URL"),
        ("[fleet]\nredis = \"redis//:s3cret@h:1/0\"", "is not a Redis URL"),
        ("[fleet]\nredis = \"redis://:s3cret@[::1\"", "redis://:***@[::1"),
        ("[fleet]\nredis = \"redis://r\"\nnode = \"two words\"", "fleet.node"),
        ("[fleet]\nredis = \"redis://r\"\ntimeout = \"0s\"", "fleet.timeout"),
        ("[fleet]\nprefix = \"a b\"", "fleet.prefix"),
        ("[fleet]\nredis = \"redis+sentinel://:s3cret@h1,h2\"", "names no service"),
        ("[fleet]\nredis = \"redis+sentinel://h1:x/m\"", "sentinel \"h1:x\""),
        ("[fleet]\nredis = \"redis://r\"\nsentinel_password = \"p\"", "fleet.sentinel_password"),
    ];
    for (text, expected) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
    for (text, expected) in [
        ("[xdp]\nmode = \"fast\"", "unknown variant `fast`"),
        ("[checks]\nbare_ip = \"drop\"", "unknown variant `drop`"),
        ("[reject]\nat = \"data\"", "unknown variant `data`"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}

/// A listener on 465 was accepted and could never work: SMTPS clients start TLS at once, and
/// the proxy greets in plaintext and reads HELO in plaintext.
#[test]
fn a_listener_on_the_smtps_port_is_refused_with_the_reason_and_the_fix() {
    for address in ["0.0.0.0:465", "[::]:465"] {
        let text = format!("[[proxy.listeners]]\naddress = \"{address}\"\ncheck_helo = false\n");
        let err = parse(&text).unwrap_err().to_string();
        for expected in [
            "proxy.listeners.address",
            "port 465 is SMTPS",
            "TLS from the first byte",
            "cannot read their HELO",
            "let the MTA listen on 465 itself",
        ] {
            assert!(err.contains(expected), "{address}: {expected:?} in {err}");
        }
    }
    assert!(parse("[[proxy.listeners]]\naddress = \"0.0.0.0:587\"\n").is_ok());
    assert!(parse("[xdp]\nports = [25, 465]\n").is_ok(), "XDP guards 465 all the same");
}

/// `check-config` stopped at the first bad regex; an admin fixing an imported file met its
/// mistakes one run at a time.
#[test]
fn every_bad_rule_entry_is_reported_at_once() {
    let dir = std::env::temp_dir().join(format!("helo-config-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let badhelo = dir.join("badhelo");
    let access = dir.join("helo_access");
    std::fs::write(&badhelo, "# qmail\n^dsl-\n(open\n!x{2,1}\nfine\n").unwrap();
    std::fs::write(
        &access,
        "example.net REJECT\ntypo.example REJCT\nnoaction.example\n/^bad/ REJECT\n",
    )
    .unwrap();
    let text = format!(
        "[rules]\nbadhelo_file = {:?}\naccess_file = {:?}\nregexes = [\"^ok\", \"[unclosed\"]\n\
         domains = [\"=good.example\", \"..x\"]\n",
        badhelo.display().to_string(),
        access.display().to_string()
    );
    let err = parse(&text).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    let (b, a) = (badhelo.display(), access.display());
    let expected = [
        "config rules.domains:2: \"..x\" is not a domain pattern".to_owned(),
        format!("{a}:2: \"typo.example\": \"REJCT\" is no access action; did you mean REJECT?"),
        format!("{a}:3: \"noaction.example\" has a pattern but no action"),
        "config rules.regexes:2: bad regex \"[unclosed\": unclosed character class".to_owned(),
        format!("{b}:3: bad regex \"(open\": unclosed group"),
        format!("{b}:4: bad regex \"x{{2,1}}\""),
    ];
    assert!(err.starts_with("6 bad rule entries, each with its file and line:\n"), "{err}");
    // The warnings come too (the skipped regexp line): an admin fixing the errors needs them.
    let (err, warning) = err.split_once("\nand a warning:\n").expect("the warning");
    assert!(warning.trim().starts_with(&format!("{a}:4: \"/^bad/\" is a regexp")), "{warning}");
    let lines: Vec<&str> = err.lines().skip(1).map(str::trim).collect();
    assert_eq!(lines.len(), expected.len(), "{err}");
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(line.starts_with(expected.as_str()), "{expected:?} in:\n{err}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Config::load(Some(Path::new("/nonexistent/helo.toml"))).unwrap_err();
    assert!(err.to_string().contains("cannot read config file /nonexistent/helo.toml"));
}

#[test]
fn proxy_listeners_and_limits() {
    let config = parse(
        "[proxy]\nupstream = \"127.0.0.1:2525\"\nproxy_protocol = \"none\"\n\
         [[proxy.listeners]]\naddress = \"0.0.0.0:25\"\n\
         [[proxy.listeners]]\naddress = \"[::]:587\"\ncheck_helo = false\n",
    )
    .unwrap();
    assert_eq!(
        config.proxy.listeners,
        vec![
            ListenerConfig { address: "0.0.0.0:25".parse().unwrap(), check_helo: true },
            ListenerConfig { address: "[::]:587".parse().unwrap(), check_helo: false },
        ]
    );
    assert_eq!(config.proxy.upstream, "127.0.0.1:2525".parse().unwrap());
    assert_eq!(config.proxy.proxy_protocol, ProxyProtocol::None);
    let defaults = parse("").unwrap();
    assert_eq!(defaults.proxy.listeners.len(), 2);
    assert_eq!(defaults.proxy.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(
        defaults.escalation,
        Escalation { factor: 2, max_ttl: Duration::from_secs(604_800), history: 100_000 }
    );
}

fn with_flags(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let path = Path::new("test.toml");
    Config::from_raw(parse_raw(text, path)?, overrides, Some(path), &host())
}

/// A relative `--pin-dir` skipped the check that refuses a relative xdp.pin_dir: the flags were
/// written over the config after it had validated. They are written over the raw file now, so
/// each is checked as the key it replaces, and an error names the flag.
#[test]
fn flags_are_validated_like_the_keys_they_replace() {
    let cases = [
        (
            Overrides { pin_dir: Some("relative/pins".into()), ..Overrides::default() },
            "--pin-dir: must be an absolute path under a bpffs",
        ),
        (
            Overrides { interface: Some("far-too-long-a-name".into()), ..Overrides::default() },
            "--iface: \"far-too-long-a-name\" is not an interface name",
        ),
        (
            Overrides { listen: vec!["0.0.0.0:465".parse().unwrap()], ..Overrides::default() },
            "--listen: 0.0.0.0:465: port 465 is SMTPS",
        ),
    ];
    for (overrides, expected) in cases {
        let err = with_flags("", &overrides).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{overrides:?}: {expected:?} in {err}");
    }
    // The file's own bad value is still named by its file and key.
    let err = with_flags("[xdp]\npin_dir = \"relative\"", &Overrides::default()).unwrap_err();
    assert!(err.to_string().starts_with("config file test.toml: xdp.pin_dir: "), "{err}");
    // A flag replaces the file's value before it is checked.
    let overrides = Overrides { pin_dir: Some("/sys/fs/bpf/other".into()), ..Overrides::default() };
    assert!(with_flags("[xdp]\npin_dir = \"relative\"", &overrides).is_ok());
}

#[test]
fn flags_replace_the_keys_of_the_file() {
    let overrides = Overrides {
        pin_dir: Some("/sys/fs/bpf/other".into()),
        interface: Some("eth9".into()),
        mode: Some(AttachMode::Skb),
        listen: vec!["127.0.0.1:2525".parse().unwrap(), "[::1]:2526".parse().unwrap()],
        upstream: Some("[::1]:10026".parse().unwrap()),
        proxy_protocol: Some(ProxyProtocol::Transparent),
    };
    let file = "[xdp]\ninterface = \"eth0\"\nmode = \"native\"\n\
                [proxy]\nupstream = \"127.0.0.1:2525\"\nproxy_protocol = \"v1\"\n\
                [[proxy.listeners]]\naddress = \"0.0.0.0:587\"\ncheck_helo = false\n";
    let config = with_flags(file, &overrides).unwrap();
    assert_eq!(config.xdp.pin_dir, PathBuf::from("/sys/fs/bpf/other"));
    assert_eq!(config.xdp.interface.as_deref(), Some("eth9"));
    assert_eq!(config.xdp.mode, AttachMode::Skb);
    assert_eq!(
        config.proxy.listeners,
        vec![
            ListenerConfig { address: "127.0.0.1:2525".parse().unwrap(), check_helo: true },
            ListenerConfig { address: "[::1]:2526".parse().unwrap(), check_helo: true },
        ]
    );
    assert_eq!(config.proxy.upstream, "[::1]:10026".parse().unwrap());
    assert_eq!(config.proxy.proxy_protocol, ProxyProtocol::Transparent);
    let unchanged = with_flags(file, &Overrides::default()).unwrap();
    assert_eq!(unchanged.xdp.interface.as_deref(), Some("eth0"));
    assert_eq!(unchanged.proxy.listeners.len(), 1);
}

#[test]
fn the_policy_service_listens_where_it_is_told_and_alone_if_asked() {
    let config = parse(
        "[proxy]\nlisteners = []\n[policy]\nlisteners = [\"127.0.0.1:10040\", \
         \"inet:[::1]:10041\", \"unix:/run/helo-filter/policy.sock\"]\nsocket_mode = \"0666\"\n",
    )
    .unwrap();
    assert!(config.proxy.listeners.is_empty(), "the proxy off, the policy service alone");
    assert_eq!(
        config.policy.listeners,
        [
            PolicyListen::Inet("127.0.0.1:10040".parse().unwrap()),
            PolicyListen::Inet("[::1]:10041".parse().unwrap()),
            PolicyListen::Unix("/run/helo-filter/policy.sock".into()),
        ]
    );
    assert_eq!(
        (config.policy.socket_mode, config.policy.socket_group.as_deref()),
        (0o666, Some("postfix"))
    );
    assert!(parse("").unwrap().policy.listeners.is_empty(), "off by default");
}

#[test]
fn a_policy_listener_off_loopback_needs_allow_remote_and_nothing_listening_is_refused() {
    let error = parse("[policy]\nlisteners = [\"0.0.0.0:10040\"]\n").unwrap_err().to_string();
    assert!(error.contains("policy.listeners") && error.contains("allow_remote"), "{error}");
    let allowed = parse("[policy]\nlisteners = [\"0.0.0.0:10040\"]\nallow_remote = true\n");
    assert!(allowed.is_ok());
    let error = parse("[policy]\nlisteners = [\"unix:relative.sock\"]\n").unwrap_err().to_string();
    assert!(error.contains("absolute"), "{error}");
    let error = parse("[policy]\nsocket_mode = \"rw\"\n").unwrap_err().to_string();
    assert!(error.contains("policy.socket_mode"), "{error}");
    let error = parse("[proxy]\nlisteners = []\n").unwrap_err().to_string();
    assert!(error.contains("no listeners at all"), "{error}");
}

/// Found trying the proxy as a new user: a bot that echoes the proxy's own banner name back as
/// its HELO passed.
#[test]
fn the_name_the_proxy_greets_with_is_part_of_the_identity() {
    let config =
        parse("[identity]\ndetect = true\n[proxy]\nhostname = \"gw.trial.test\"\n").unwrap();
    assert!(config.rules.identity.names.lookup("gw.trial.test").is_some());
    let config =
        parse("[identity]\ndetect = false\n[proxy]\nhostname = \"gw.trial.test\"\n").unwrap();
    assert!(
        config.rules.identity.names.lookup("gw.trial.test").is_none(),
        "detect = false: as written"
    );
}

#[test]
fn the_fleet_is_off_by_default_and_names_itself_after_the_host() {
    let config = parse("").unwrap();
    assert_eq!(config.fleet.redis, None);
    let config = parse("[fleet]\nredis = \"redis://helo:s3cret@10.0.0.5:6380/2\"").unwrap();
    let redis = config.fleet.redis.unwrap();
    assert_eq!(redis.expose(), "redis://helo:s3cret@10.0.0.5:6380/2");
    assert_eq!(redis.to_string(), "redis://helo:***@10.0.0.5:6380/2", "never the password");
    assert_eq!(format!("{redis:?}"), "redis://helo:***@10.0.0.5:6380/2");
    assert_eq!(config.fleet.node, "mx1.example.com");
    assert_eq!(config.fleet.prefix, "helo-filter:");
    assert_eq!(config.fleet.timeout, Duration::from_secs(2));
    let config = parse("[fleet]\nredis = \"rediss://r:6379\"\nnode = \"mx2\"").unwrap();
    assert_eq!(config.fleet.node, "mx2");
}

#[test]
fn the_fleet_takes_a_sentinel_service_and_never_shows_its_passwords() {
    let url = "redis+sentinel://:s3cret@10.0.0.5:26379,10.0.0.6:26379/mymaster/0";
    let text = format!("[fleet]\nredis = \"{url}\"\nsentinel_password = \"watch3rs\"");
    let config = parse(&text).unwrap();
    let redis = config.fleet.redis.as_ref().unwrap();
    assert_eq!(redis.expose(), url);
    assert_eq!(redis.to_string(), "redis+sentinel://:***@10.0.0.5:26379,10.0.0.6:26379/mymaster/0");
    assert_eq!(config.fleet.sentinel_password.as_ref().map(|p| p.0.as_str()), Some("watch3rs"));
    let shown = format!("{:?}", config.fleet);
    assert!(!shown.contains("s3cret") && !shown.contains("watch3rs"), "{shown}");
    assert!(parse("[fleet]\nredis = \"rediss+sentinel://h1,h2/m\"").is_ok());
}

/// A URL with a typo in its scheme was repeated in the error, password and all, and that
/// error reaches the journal (the unit runs check-config before each start).
#[test]
fn a_redis_password_is_never_shown_even_in_a_malformed_url() {
    for url in ["redis//:s3cret@h:1/0", "redis:/:s3cret@h:1/0", "s3cret", "redis://u:s3cret@h:x/0"]
    {
        let err = parse(&format!("[fleet]\nredis = \"{url}\"")).unwrap_err().to_string();
        assert!(err.contains("fleet.redis") && !err.contains("s3cret"), "{url}: {err}");
    }
    for (url, shown) in [
        ("redis://u:s3cret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("redis:/:s3cret@h", "redis:***@h"),
        ("rediss://s3cret@h", "rediss://***@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ] {
        assert_eq!(RedisUrl(url.into()).to_string(), shown, "{url}");
    }
}

#[test]
fn the_pregreet_test_defaults_to_postscreen_and_refuses_bad_values() {
    let config = parse("").unwrap();
    assert_eq!(config.rules.action(Check::Pregreet), CheckAction::Log);
    let pregreet = config.proxy.pregreet;
    assert_eq!(pregreet.wait, Duration::from_secs(6), "postscreen_greet_wait");
    assert_eq!(pregreet.pass_ttl, Duration::from_secs(86_400), "postscreen_greet_ttl");
    assert_eq!(pregreet.pass_cache_size, 100_000);
    // The example file shows every key (the equality test above sees values only).
    let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
    assert_eq!(example["checks"]["pregreet"].as_str(), Some("log"));
    let section = example["pregreet"].as_table().expect("a [pregreet] section");
    let keys: Vec<&str> = section.keys().map(String::as_str).collect();
    assert_eq!(keys, ["pass_cache_size", "pass_ttl", "wait"]);

    let config = parse(
        "[checks]\npregreet = \"ban\"\n[pregreet]\nwait = \"2s\"\npass_ttl = \"1h\"\npass_cache_size = 10",
    )
    .unwrap();
    assert_eq!(config.rules.action(Check::Pregreet), CheckAction::Ban);
    let pregreet = config.proxy.pregreet;
    assert_eq!(
        (pregreet.wait, pregreet.pass_ttl),
        (Duration::from_secs(2), Duration::from_secs(3600))
    );
    assert_eq!(pregreet.pass_cache_size, 10);

    for (text, expected) in [
        ("[pregreet]\nwait = \"0s\"", "pregreet.wait: must be longer than 0s"),
        ("[pregreet]\nwait = \"2m\"", "pregreet.wait: at most 60s"),
        ("[pregreet]\nwait = \"6\"", "6s"),
        ("[pregreet]\npass_ttl = \"0s\"", "pregreet.pass_ttl"),
        ("[pregreet]\npass_cache_size = 0", "pregreet.pass_cache_size: must be at least 1"),
        ("[pregreet]\ngreet_wait = \"6s\"", "unknown field `greet_wait`"),
        ("[checks]\npregreet = \"drop\"", "unknown variant `drop`"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}

#[test]
fn helo_reuse_defaults_to_log_20_networks_an_hour_and_refuses_bad_values() {
    let config = parse("").unwrap();
    assert_eq!(config.rules.action(Check::HeloReuse), CheckAction::Log);
    assert_eq!(
        config.rules.reuse,
        crate::rules::ReuseLimits { clients: 20, window: Duration::from_secs(3600) }
    );
    // The example file shows every key (the equality test above sees values only).
    let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
    assert_eq!(example["checks"]["helo_reuse"].as_str(), Some("log"));
    let section = example["reuse"].as_table().expect("a [reuse] section");
    let keys: Vec<&str> = section.keys().map(String::as_str).collect();
    assert_eq!(keys, ["clients", "window"]);

    let config =
        parse("[checks]\nhelo_reuse = \"ban\"\n[reuse]\nclients = 1000\nwindow = \"1d\"").unwrap();
    assert_eq!(config.rules.action(Check::HeloReuse), CheckAction::Ban);
    assert_eq!(
        config.rules.reuse,
        crate::rules::ReuseLimits { clients: 1000, window: Duration::from_secs(86_400) }
    );

    for (text, expected) in [
        ("[reuse]\nclients = 1", "reuse.clients: 1 would make every HELO name reused"),
        ("[reuse]\nclients = 0", "give 2 or more"),
        ("[reuse]\nclients = 1001", "reuse.clients: 1001 is more than the 1000 networks"),
        ("[reuse]\nwindow = \"0s\"", "reuse.window: must be longer than 0s"),
        ("[reuse]\nwindow = \"soon\"", "reuse.window"),
        ("[reuse]\nnetworks = 20", "unknown field `networks`"),
        ("[checks]\nhelo_reuse = \"drop\"", "unknown variant `drop`"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}

const AGENT_SOCKETS: &str = "[[proxy.listeners]]\naddress = \"127.0.0.1:2525\"\n[[proxy.listeners]]\naddress = \"[::1]:2525\"\n";

#[test]
fn steering_takes_the_mta_endpoints_and_the_agent_sockets_one_per_family() {
    let config = parse("").unwrap();
    assert!(!config.steer.enabled(), "off by default: today's mode");
    assert_eq!(config.steer.pass_ttl(), None);
    let text = format!(
        "[steer]\naddresses = [\"203.0.113.5:25\", \"[2001:db8::5]:25\", \"[::ffff:203.0.113.5]:25\"]\n\
         pass_ttl = \"12h\"\n{AGENT_SOCKETS}"
    );
    let config = parse(&text).unwrap();
    let endpoints: Vec<String> = config.steer.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(endpoints, ["203.0.113.5:25", "[2001:db8::5]:25"], "mapped v4 is v4, once");
    assert_eq!(config.steer.pass_ttl(), Some(Duration::from_secs(12 * 3600)));
    assert_eq!(config.steer.sizes, PassSizes::default());
    let none = parse(&text.replace("\"12h\"", "\"0s\"")).unwrap();
    assert_eq!(none.steer.pass_ttl(), None, "0s: no passes, steering still on");
    assert!(none.steer.enabled());
}

#[test]
fn steering_refuses_what_would_loop_or_leave_strangers_unjudged() {
    let steer = |extra: &str| {
        parse(&format!("[steer]\naddresses = [\"203.0.113.5:25\", \"[2001:db8::5]:25\"]\n{extra}"))
            .unwrap_err()
            .to_string()
    };
    let err = steer("");
    assert!(
        err.contains("proxy.listeners") && err.contains("covers the steered endpoint"),
        "{err}"
    );
    let err = steer("[[proxy.listeners]]\naddress = \"127.0.0.1:2525\"\n");
    assert!(err.contains("no IPv6 listener") && err.contains("[::1]:2525"), "{err}");
    let err = steer(&format!("{AGENT_SOCKETS}[[proxy.listeners]]\naddress = \"127.0.0.2:2525\"\n"));
    assert!(err.contains("one per address family"), "{err}");
    let err = steer(&format!("{AGENT_SOCKETS}[proxy]\nupstream = \"203.0.113.5:25\"\n"));
    assert!(err.contains("proxy.upstream") && err.contains("steered back"), "{err}");
    let err = steer(&format!("pass_ttl = \"60d\"\n{AGENT_SOCKETS}"));
    assert!(err.contains("steer.pass_ttl"), "{err}");
    for bad in ["0.0.0.0:25", "[::]:25", "203.0.113.5:465"] {
        let err = parse(&format!("[steer]\naddresses = [\"{bad}\"]\n{AGENT_SOCKETS}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("steer.addresses"), "{bad}: {err}");
    }
    // A submission listener (no HELO judged) is not an agent socket: it may stay beside them.
    let text = format!(
        "[steer]\naddresses = [\"203.0.113.5:25\"]\n{AGENT_SOCKETS}\
         [[proxy.listeners]]\naddress = \"0.0.0.0:587\"\ncheck_helo = false\n"
    );
    assert!(parse(&text).is_ok());
}

#[test]
fn a_steered_port_xdp_does_not_guard_is_a_warning() {
    let text = format!("[steer]\naddresses = [\"203.0.113.5:2526\"]\n{AGENT_SOCKETS}");
    let text = text.replacen("[::1]:2525", "[::1]:2527", 1);
    let config = parse(&text).unwrap();
    assert!(
        config.warnings.iter().any(|w| w.contains("not in xdp.ports")),
        "{:?}",
        config.warnings
    );
}
