//! One policy connection's knowledge of the SMTP session its requests belong to, sans-IO: the
//! decisions of the policy door. Postfix's smtpd keeps one policy connection per process and
//! serves sessions one after another on it. A session is its client's address and port
//! (`client_port`, Postfix 3.0 and later): the `instance` attribute is per mail transaction,
//! empty before MAIL FROM and new at each one, so it cannot tell sessions apart (without
//! `client_port` it is the best there is).
//!
//! One SMTP session is heard once: its HELO is judged once (again only if it changes), by the
//! judge's [`Hearing`], with what Postfix says of the client's DNS (`client_name`, its
//! forward-confirmed name) and, where the verdict rests on DNS, the lookups the door makes
//! ([`Step::Lookup`], answered by [`PolicySession::on_dns`]). Each new verdict is concluded at
//! once (logged, observed, banned: the kernel drops only a banned source's new connections,
//! so the session that earned it goes on to hear Postfix's 5xx). Lookups only `log` checks
//! want never hold Postfix: the answer goes at once, and the door looks in the background
//! ([`PolicySession::take_late`]), logging what they find in a line of their own (`session
//! dns`), since the session's line is written at its verdict.

use std::net::IpAddr;
use std::time::Instant;

use super::protocol::{Answer, Request};
use crate::dns::Need;
use crate::judge::{Client, Door, Heard, Hearing, Judge, Law, Live, Record};
use crate::rules::{Action, ClientDns, DnsFacts, HeloDns, Verdict};

/// What the door does for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this answer.
    Answer(Answer),
    /// Look up the HELO name's records (`helo`) and the client's forward-confirmed reverse
    /// name (`client`, where Postfix did not say it), and give them to
    /// [`PolicySession::on_dns`], which answers (or asks again).
    Lookup { helo: Option<String>, client: bool, need: Need },
}

/// Lookups for `log` checks, made in the background after the answer went out.
#[derive(Debug)]
pub struct Late {
    pub client: IpAddr,
    /// The HELO as Postfix sent it, and the name to look up.
    pub argument: String,
    pub name: String,
    /// What Postfix said of the client (`NotLooked`: nothing; look it up).
    pub client_dns: ClientDns,
}

#[derive(Default)]
pub struct PolicySession {
    key: Option<SessionKey>,
    client: Option<Client>,
    hearing: Option<Hearing>,
    started: Option<Instant>,
    /// Lookups for `log` checks of the HELO judged last, for the door to make.
    late: Option<Late>,
}

/// One SMTP session, as the policy requests tell it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SessionKey {
    address: IpAddr,
    port: Option<u16>,
    /// Only without a port.
    instance: Option<String>,
}

impl SessionKey {
    fn of(request: &Request, address: IpAddr) -> Self {
        SessionKey {
            address,
            port: request.client_port,
            instance: if request.client_port.is_some() { None } else { request.instance.clone() },
        }
    }
}

/// What Postfix says of the client's DNS, whenever it sends the client's names
/// (`client_name` is its forward-confirmed name, as Postfix checked it: what `dynamic`,
/// `helo_not_client` and `helo_reuse` spare a client telling the truth for).
pub fn client_dns(request: &Request) -> ClientDns {
    match (&request.client_name, &request.reverse_client_name) {
        (None, None) => ClientDns::NotLooked,
        (verified, reverse) => crate::dns::from_postfix(verified.as_deref(), reverse.as_deref()),
    }
}

/// The DNS facts of `helo` and `client`, `None` when neither was looked at.
fn facts(helo: HeloDns, client: ClientDns) -> Option<DnsFacts> {
    match (helo, client) {
        (HeloDns::NotLooked, ClientDns::NotLooked) => None,
        (helo, client) => Some(DnsFacts { helo, client }),
    }
}

impl PolicySession {
    /// Whether `request` belongs to another SMTP session than the one before it.
    pub fn is_new(&self, request: &Request) -> bool {
        request
            .client_address
            .is_some_and(|address| self.key.as_ref() != Some(&SessionKey::of(request, address)))
    }

    /// The verdict of the session's HELO, once judged.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.hearing.as_ref()?.verdict()
    }

    /// What the door does for `request`: an answer, or first a lookup. A new verdict is
    /// concluded (logged, observed, banned) on the spot.
    pub fn on_request(&mut self, request: &Request, judge: &Judge, live: &Live) -> Step {
        if request.request.as_deref().is_some_and(|r| r != "smtpd_access_policy") {
            return Step::Answer(Answer::Dunno);
        }
        let Some(address) = request.client_address else {
            tracing::debug!("policy request without a client address: DUNNO");
            return Step::Answer(Answer::Dunno);
        };
        let key = SessionKey::of(request, address);
        if self.key.as_ref() != Some(&key) {
            let client = Client::new(address, None, false);
            let mut hearing = Hearing::new(&client);
            if judge.dns().is_some() {
                hearing.look();
            }
            *self = PolicySession {
                key: Some(key),
                client: Some(client),
                hearing: Some(hearing),
                started: Some(Instant::now()),
                late: None,
            };
        }
        let Some(helo) = request.helo_name.as_deref().filter(|h| !h.is_empty()) else {
            tracing::debug!(
                client = %address,
                state = request.protocol_state.as_deref().unwrap_or(""),
                "policy request without a HELO yet: DUNNO"
            );
            return Step::Answer(Answer::Dunno);
        };
        let hearing = self.hearing.as_mut().expect("set with the key");
        // Postfix repeats the HELO in every request of the session: judged when it changes,
        // unless the session is rejected already.
        if !hearing.rejected() && hearing.helo() != Some(helo) {
            let at_hand = facts(HeloDns::NotLooked, client_dns(request));
            let heard = hearing.hear(&judge.law(live), helo, at_hand.as_ref());
            return self.heard(heard, judge, live);
        }
        Step::Answer(self.answer(live))
    }

    /// What DNS said for the last [`Step::Lookup`] (a part left `NotLooked`: no slot free):
    /// the verdict, concluded, and the answer, or another lookup.
    pub fn on_dns(&mut self, facts: DnsFacts, judge: &Judge, live: &Live) -> Step {
        let hearing = self.hearing.as_mut().expect("a lookup belongs to a session");
        let heard = hearing.on_dns(&judge.law(live), facts);
        self.heard(heard, judge, live)
    }

    /// Lookups for the `log` checks of the HELO judged last, to make in the background.
    pub fn take_late(&mut self) -> Option<Late> {
        self.late.take()
    }

    fn heard(&mut self, heard: Heard, judge: &Judge, live: &Live) -> Step {
        match heard {
            Heard::Lookup { helo, client, need } => return Step::Lookup { helo, client, need },
            Heard::Later { helo: name } => {
                let hearing = self.hearing.as_ref().expect("heard in a session");
                self.late = Some(Late {
                    client: self.client.expect("a session's client").ip,
                    argument: hearing.helo().unwrap_or_default().to_owned(),
                    name,
                    client_dns: hearing.dns_facts().map(|d| d.client.clone()).unwrap_or_default(),
                });
                self.conclude(judge, live);
            }
            Heard::Judged => self.conclude(judge, live),
        }
        Step::Answer(self.answer(live))
    }

    /// The answer for the session's verdict.
    fn answer(&self, live: &Live) -> Answer {
        let verdict = self.verdict().expect("judged before answering");
        match verdict.action {
            Action::Pass => Answer::Dunno,
            Action::Reject | Action::Ban => match &verdict.reply {
                Some(custom) => Answer::Refuse { code: custom.code, text: custom.text.clone() },
                None => {
                    Answer::Refuse { code: 553, text: format!("5.7.1 {}", live.reject_message) }
                }
            },
        }
    }

    /// A new verdict: its log line, its observation, its ban.
    fn conclude(&mut self, judge: &Judge, live: &Live) {
        let started = *self.started.get_or_insert_with(Instant::now);
        let (Some(client), Some(hearing)) = (&self.client, &self.hearing) else { return };
        let helos = if hearing.helos().len() > 1 { hearing.helos() } else { &[] };
        let dns = hearing.dns();
        let record = Record {
            door: Door::Policy,
            client,
            helo: hearing.helo(),
            helos,
            verdict: hearing.verdict(),
            logged: hearing.logged(),
            dns: dns.as_deref(),
            ms: started.elapsed().as_millis() as u64,
            transport: None,
        };
        judge.conclude(&record, live);
    }
}

/// The `log` matches of `late`'s HELO with what its background lookups found (`facts`), as
/// the judge would have noted them: the `session dns` line's.
pub fn late_logged(live: &Live, late: &Late, facts: &DnsFacts) -> Vec<&'static str> {
    let law = Law::given(&live.rules, None);
    let mut hearing = Hearing::of(Some(late.client), false);
    hearing.hear(&law, &late.argument, Some(facts));
    hearing.logged().to_vec()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, HostFacts};
    use crate::judge::Parts;

    fn judge_with(extra: &str, parts: Parts) -> Arc<Judge> {
        let text = format!("[identity]\ndetect = false\ndomains = [\"example.com\"]\n{extra}");
        let config = Config::parse(&text, Path::new("t"), &HostFacts::default()).unwrap();
        Judge::new(Live::of(&config), parts)
    }

    fn judge(extra: &str) -> Arc<Judge> {
        judge_with(extra, Parts::default())
    }

    /// What the door answers `request`, the lookups it asks for answered with nothing (no
    /// resolver here: the DNS facts are what Postfix sends).
    fn ask(session: &mut PolicySession, request: &Request, judge: &Judge) -> Answer {
        let live = judge.live();
        let mut step = session.on_request(request, judge, &live);
        loop {
            match step {
                Step::Answer(answer) => return answer,
                Step::Lookup { .. } => step = session.on_dns(DnsFacts::default(), judge, &live),
            }
        }
    }

    fn request(instance: &str, helo: Option<&str>, client: &str) -> Request {
        Request {
            request: Some("smtpd_access_policy".into()),
            protocol_state: Some("RCPT".into()),
            helo_name: helo.map(str::to_owned),
            client_address: Some(client.parse().unwrap()),
            instance: Some(instance.into()),
            ..Default::default()
        }
    }

    fn sessions(judge: &Judge) -> u64 {
        let now = crate::clock::unix_ns() / 1_000_000_000;
        let rows = judge.court().report.lock().unwrap().top(now, Duration::from_secs(60), 100);
        rows.iter().map(|r| r.sessions).sum()
    }

    #[test]
    fn a_forged_helo_is_refused_with_the_proxys_text_and_judged_once_per_session() {
        let judge = judge("");
        let mut session = PolicySession::default();
        let forged = request("a.1", Some("mx.example.com"), "203.0.113.9");
        let refuse = Answer::Refuse {
            code: 553,
            text: "5.7.1 sorry, your HELO host name has been denied".into(),
        };
        assert_eq!(ask(&mut session, &forged, &judge), refuse);
        assert_eq!(ask(&mut session, &forged, &judge), refuse, "every RCPT of it");
        let good = request("a.1", Some("mail.sender.example"), "203.0.113.9");
        assert_eq!(ask(&mut session, &good, &judge), refuse, "rejected stays rejected");
        assert_eq!(sessions(&judge), 1, "one session, one observation");
        let next = request("b.2", Some("mail.sender.example"), "203.0.113.9");
        assert_eq!(ask(&mut session, &next, &judge), Answer::Dunno, "a new instance");
        assert_eq!(sessions(&judge), 2);
    }

    #[test]
    fn no_helo_yet_is_dunno_and_a_changed_helo_is_judged_with_the_one_before() {
        let judge = judge("[checks]\nchanged = \"reject\"");
        let mut session = PolicySession::default();
        assert_eq!(ask(&mut session, &request("c.1", None, "203.0.113.9"), &judge), Answer::Dunno);
        let one = request("c.1", Some("one.sender.example"), "203.0.113.9");
        assert_eq!(ask(&mut session, &one, &judge), Answer::Dunno);
        let two = request("c.1", Some("two.sender.example"), "203.0.113.9");
        assert!(matches!(ask(&mut session, &two, &judge), Answer::Refuse { code: 553, .. }));
        assert_eq!(session.verdict().unwrap().rule, "changed");
    }

    /// An access-table entry's own reply is carried over; a 4xx entry is a temporary refusal
    /// and never a ban; a `log` check answers DUNNO.
    #[test]
    fn entry_replies_4xx_entries_and_log_checks() {
        let dir = std::env::temp_dir().join(format!("helo-policy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let access = dir.join("helo_access");
        std::fs::write(
            &access,
            "go.away.example 550 5.7.1 Go away\nslow.down.example 450 4.7.1 Try later\n",
        )
        .unwrap();
        let judge = judge(&format!(
            "[rules]\naccess_file = {:?}\n[checks]\ntable = \"ban\"\nno_dot = \"log\"\n",
            access.display()
        ));
        let answer = |instance: &str, helo: &str| {
            let mut session = PolicySession::default();
            let answer = ask(&mut session, &request(instance, Some(helo), "203.0.113.9"), &judge);
            (answer, session.verdict().map(|v| v.action))
        };
        assert_eq!(
            answer("e.1", "go.away.example"),
            (Answer::Refuse { code: 550, text: "5.7.1 Go away".into() }, Some(Action::Ban))
        );
        assert_eq!(
            answer("e.2", "slow.down.example"),
            (Answer::Refuse { code: 450, text: "4.7.1 Try later".into() }, Some(Action::Reject)),
            "a 4xx entry never bans"
        );
        assert_eq!(answer("e.3", "nodot"), (Answer::Dunno, Some(Action::Pass)), "log: DUNNO");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request as Postfix 3.x sends it at `state`: with `client_port`; `instance` empty
    /// before MAIL FROM.
    fn postfix(state: &str, client: &str, port: u16, instance: &str, helo: &str) -> Request {
        Request {
            protocol_state: Some(state.into()),
            client_port: Some(port),
            ..request(instance, Some(helo), client)
        }
    }

    /// A judge whose bans reach a ban worker over a fake store; returns what was banned.
    fn judge_with_bans() -> (
        Arc<Judge>,
        std::thread::JoinHandle<crate::blocklist::Blocklist<crate::blocklist::fake::FakeStore>>,
    ) {
        let (bans, worker) =
            crate::blocklist::fake::spawn_worker(crate::blocklist::fake::FakeStore::default());
        (judge_with("", Parts { bans: Some(bans), ..Parts::default() }), worker)
    }

    fn banned(
        judge: Arc<Judge>,
        worker: std::thread::JoinHandle<
            crate::blocklist::Blocklist<crate::blocklist::fake::FakeStore>,
        >,
    ) -> Vec<(String, String)> {
        use crate::blocklist::BanStore as _;
        drop(judge);
        let list = worker.join().unwrap();
        let entries = list.store().entries().unwrap();
        entries
            .iter()
            .map(|(t, v)| (t.to_string(), list.reason_of(v.reason).unwrap_or_default()))
            .collect()
    }

    /// Regression (found trying the README's HELO-stage placement against a real Postfix):
    /// Postfix sends `instance=` empty before MAIL FROM, and the service took every request on
    /// a connection for one session, so a bot's forged HELO banned the innocent client the
    /// same smtpd had served before, and the next good client was refused.
    #[test]
    fn sessions_on_one_connection_are_told_apart_by_client_address_and_port() {
        let (judge, worker) = judge_with_bans();
        let mut connection = PolicySession::default();
        let good = postfix("EHLO", "203.0.113.3", 40001, "", "good.example.org");
        assert_eq!(ask(&mut connection, &good, &judge), Answer::Dunno);
        let bot = postfix("EHLO", "203.0.113.8", 40002, "", "mx.example.com");
        assert!(matches!(ask(&mut connection, &bot, &judge), Answer::Refuse { code: 553, .. }));
        let next = postfix("EHLO", "203.0.113.4", 40003, "", "good6.example.org");
        assert_eq!(ask(&mut connection, &next, &judge), Answer::Dunno, "not the bot's verdict");
        let banned = banned(judge, worker);
        assert_eq!(banned.len(), 1, "{banned:?}");
        assert_eq!(banned[0].0, "203.0.113.8", "the bot, never the client before it");
    }

    /// Regression: `instance` changes with each transaction, and a session with two was judged
    /// (and banned, escalated) twice.
    #[test]
    fn one_session_with_several_transactions_is_judged_and_banned_once() {
        let (judge, worker) = judge_with_bans();
        let mut connection = PolicySession::default();
        for instance in ["a.1", "a.2", "a.3"] {
            let rcpt = postfix("RCPT", "203.0.113.9", 40100, instance, "mx.example.com");
            assert!(matches!(ask(&mut connection, &rcpt, &judge), Answer::Refuse { .. }));
        }
        assert_eq!(sessions(&judge), 1, "one observation");
        assert_eq!(banned(judge, worker).len(), 1, "one ban");
    }

    /// HELO reuse at the policy door: the sessions of the memory the rules carry count, the
    /// one that reaches reuse.clients is refused, and a client Postfix forward-confirmed under
    /// the HELO name is neither counted nor refused, with or without a resolver.
    #[tokio::test]
    async fn the_policy_door_counts_reuse_in_the_rules_memory_and_spares_a_confirmed_client() {
        let judge = judge("[checks]\nhelo_reuse = \"reject\"\n[reuse]\nclients = 5\n");
        let from = |n: u8, client_name: &str| {
            let mut request = postfix("RCPT", &format!("198.51.{n}.9"), 40000, "i.1", "bulk.test");
            request.client_name = Some(client_name.into());
            request.reverse_client_name = Some(client_name.into());
            request
        };
        let mut answers = Vec::new();
        for n in 1..=6 {
            let mut session = PolicySession::default();
            let request = from(n, "unknown");
            answers.push(ask(&mut session, &request, &judge));
            let mut confirmed = PolicySession::default();
            let request = from(100 + n, "bulk.test");
            let looked = facts(HeloDns::NotLooked, client_dns(&request));
            assert_eq!(
                looked.as_ref().map(|d| &d.client),
                Some(&ClientDns::Confirmed("bulk.test".into()))
            );
            assert_eq!(
                ask(&mut confirmed, &request, &judge),
                Answer::Dunno,
                "Postfix confirmed its name: never reuse"
            );
        }
        assert_eq!(answers[..4], [Answer::Dunno, Answer::Dunno, Answer::Dunno, Answer::Dunno]);
        assert!(matches!(answers[4], Answer::Refuse { code: 553, .. }), "{:?}", answers[4]);
        assert!(matches!(answers[5], Answer::Refuse { code: 553, .. }), "{:?}", answers[5]);
        let now = crate::judge::reuse_now();
        let count = judge.memory().count("bulk.test", now, judge.live().rules.reuse.window);
        assert_eq!(count.networks, 6, "the confirmed clients were not counted");
    }

    #[test]
    fn other_request_types_are_dunno() {
        let judge = judge("");
        let mut other = request("d.1", Some("mx.example.com"), "203.0.113.9");
        other.request = Some("junk".into());
        assert_eq!(ask(&mut PolicySession::default(), &other, &judge), Answer::Dunno);
    }
}
