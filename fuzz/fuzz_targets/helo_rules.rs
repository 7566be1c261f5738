//! Arbitrary HELO arguments (and client addresses) through the rules: no panic, and a verdict
//! that names a rule and gives a reason.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use helo_agent::config::{Config, HostFacts};
use helo_agent::rules::{Action, ClientDns, Facts, HeloDns, RuleSet};
use libfuzzer_sys::fuzz_target;

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let text = "[identity]\ndetect = false\ndomains = [\"example.com\", \"=mx.example.net\"]\n\
                    addresses = [\"192.0.2.25\", \"2001:db8::25\"]\n\
                    [rules]\ndomains = [\".dyn.example\", \"=bad.example\"]\n\
                    regexes = ['^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}', '!\\.', 'localhost', \
                    '[~!@#$%^&*()_+`={}|\\;\"<>?,/]']\n[checks]\ndynamic = \"ban\"\nchanged = \"reject\"\n";
        (*Config::parse(text, Path::new("fuzz"), &HostFacts::default()).unwrap().rules).clone()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (head, helo) = data.split_at(17);
    let client: IpAddr = if head[0] & 1 == 0 {
        Ipv4Addr::new(head[1], head[2], head[3], head[4]).into()
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&head[1..17]);
        Ipv6Addr::from(octets).into()
    };
    let helo = String::from_utf8_lossy(helo);
    let previous = [String::from("mail.sender.example")];
    // DNS answers from the data too: every shape the DNS checks read.
    let dns = helo_agent::rules::DnsFacts {
        helo: match head[0] >> 5 {
            0 => HeloDns::NotLooked,
            1 => HeloDns::Missing,
            2 => HeloDns::TempFail("timeout".into()),
            3 => HeloDns::Found { addresses: vec![], mx: true },
            _ => HeloDns::Found { addresses: vec![client], mx: false },
        },
        client: match head[0] & 0x18 {
            0 => ClientDns::NotLooked,
            0x08 => ClientDns::Confirmed(helo.to_ascii_lowercase()),
            _ => ClientDns::Unconfirmed(vec![]),
        },
    };
    let facts = Facts {
        client: Some(client),
        argument: &helo,
        previous: if head[0] & 2 == 0 { &[] } else { &previous },
        exempt_listener: false,
        dns: (head[0] & 4 != 0).then_some(&dns),
        pregreeted: head[0] & 1 != 0,
    };
    let verdict = rules().classify(&facts);
    assert!(!verdict.rule.is_empty() && !verdict.reason.is_empty());
    assert_eq!(verdict.ttl.is_some(), verdict.action == Action::Ban);
});
