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
                    '[~!@#$%^&*()_+`={}|\\;\"<>?,/]']\n[checks]\ndynamic = \"ban\"\nchanged = \"reject\"\n\
                    helo_reuse = \"ban\"\n[reuse]\nclients = 3\n";
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
            0x08 if head[16] & 0x20 != 0 => ClientDns::Confirmed("mail.company.example".into()),
            0x08 => ClientDns::Confirmed(helo.to_ascii_lowercase()),
            0x10 => ClientDns::TempFail("timeout".into()),
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
        // A reuse count from the last byte (an IPv6 client's last octet too: no matter).
        reuse: (head[16] & 0x80 != 0).then_some(usize::from(head[16] & 0x7f)),
        looks: head[16] & 0x40 != 0,
    };
    let verdict = rules().classify(&facts);
    assert!(!verdict.rule.is_empty() && !verdict.reason.is_empty());
    assert_eq!(verdict.ttl.is_some(), verdict.action == Action::Ban);
    if verdict.rule == "helo_reuse" {
        assert!(facts.reuse.is_some_and(|n| n >= 3), "reuse judged only from its count");
        let unchecked = matches!(facts.dns.map(|d| &d.client), Some(ClientDns::TempFail(_)));
        assert_eq!(verdict.reply.is_some(), unchecked, "450 only where the guard could not look");
    }
});
