//! What `helo-agent top` draws, as a pure function of two snapshots: [`per_second`] turns the
//! counters of the previous and the current [`Overview`] into rates, and [`draw`] lays the
//! screen out. No I/O and no clock here, so the tests draw into ratatui's `TestBackend` and
//! read the text back.
//!
//! Laid out for 80x24 (a terminal over ssh), growing with the terminal: a header line, three
//! boxes of counters (sessions, bans, kernel), the top HELOs and rules, the policy service and
//! fleet lines, and a status line.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table};

use crate::control::Overview;

/// One screen's worth: the snapshots and what the viewer knows besides.
#[derive(Clone, Copy, Debug)]
pub struct Screen<'a> {
    /// The snapshot before `current`; `None` at the first poll (no rates yet).
    pub previous: Option<&'a Overview>,
    pub current: &'a Overview,
    /// The control socket polled, named in the header.
    pub socket: &'a str,
    /// Why the last poll failed, if it did: `current` is then the last one that answered.
    pub error: Option<&'a str>,
}

/// The rate of the counter `pick` reads, per second of the agent's clock between the two
/// snapshots. `None` without a previous snapshot, without time between them, when either
/// lacks the counter, or when it went down (another agent started: its counters start at 0).
pub fn per_second(
    previous: Option<&Overview>,
    current: &Overview,
    pick: impl Fn(&Overview) -> Option<u64>,
) -> Option<f64> {
    let previous = previous?;
    let ms = current.at_ms.checked_sub(previous.at_ms).filter(|&ms| ms > 0)?;
    let gained = pick(current)?.checked_sub(pick(previous)?)?;
    Some(gained as f64 * 1000.0 / ms as f64)
}

/// A counter for a narrow column: `9999`, `12.3k`, `123k`, `1.2M`, `12.3G`.
pub fn count(n: u64) -> String {
    if n < 10_000 {
        return n.to_string();
    }
    let (value, unit) = match n {
        0..1_000_000 => (n as f64 / 1e3, "k"),
        1_000_000..1_000_000_000 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "G"),
    };
    if value < 100.0 { format!("{value:.1}{unit}") } else { format!("{value:.0}{unit}") }
}

/// A rate for a narrow column: `-` when unknown, `0`, `0.4`, `12.5`, `340`, `12.3k`.
pub fn rate(rate: Option<f64>) -> String {
    match rate {
        None => "-".to_owned(),
        Some(0.0) => "0".to_owned(),
        Some(r) if r < 100.0 => format!("{r:.1}"),
        Some(r) if r < 10_000.0 => format!("{r:.0}"),
        Some(r) => count(r as u64),
    }
}

/// Text a client chose (a HELO), made safe to print: control characters (escape sequences a
/// bot could send to the admin's terminal) become `?`, and a name longer than `width`
/// columns ends in `~`.
pub fn printable(text: &str, width: usize) -> String {
    let mut out: String =
        text.chars().map(|c| if c.is_control() { '?' } else { c }).take(width.max(1)).collect();
    if text.chars().count() > width && width > 0 {
        out.pop();
        out.push('~');
    }
    out
}

const HEADER: Style = Style::new().add_modifier(Modifier::BOLD);
const DIM: Style = Style::new().fg(Color::DarkGray);

/// Draws `screen` over the whole frame.
pub fn draw(frame: &mut Frame<'_>, screen: &Screen<'_>) {
    let [header, counters, tops, services, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(7),
        Constraint::Min(4),
        Constraint::Length(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, screen);
    let [sessions, bans, kernel] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(counters);
    draw_sessions(frame, sessions, screen);
    draw_bans(frame, bans, screen);
    draw_kernel(frame, kernel, screen);
    let [helos, rules] =
        Layout::horizontal([Constraint::Percentage(66), Constraint::Percentage(34)]).areas(tops);
    draw_helos(frame, helos, screen);
    draw_rules(frame, rules, screen);
    draw_services(frame, services, screen);
    draw_status(frame, status, screen);
}

fn draw_header(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let current = screen.current;
    let line = Line::from(vec![
        Span::styled("helo-agent top", HEADER),
        Span::raw(format!("  {}", screen.socket)),
        Span::raw(format!("  open sessions: {}", count(current.sessions_open))),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}

/// A box of counters: each row a name, its rate per second and its total (or gauge).
fn counter_table<'a>(title: &'a str, rows: Vec<(&'a str, Style, String, String)>) -> Table<'a> {
    let rows = rows.into_iter().map(|(name, style, per_second, total)| {
        Row::new(vec![
            Line::styled(name, style),
            Line::from(per_second).right_aligned(),
            Line::from(total).right_aligned(),
        ])
    });
    Table::new(rows, [Constraint::Min(7), Constraint::Length(6), Constraint::Length(7)])
        .header(
            Row::new(vec![
                Line::from(""),
                Line::from("/s").right_aligned(),
                Line::from("total").right_aligned(),
            ])
            .style(DIM),
        )
        .block(Block::bordered().title(title))
}

fn draw_sessions(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let (previous, current) = (screen.previous, screen.current);
    let row = |name, style, pick: fn(&Overview) -> u64| {
        (name, style, rate(per_second(previous, current, |o| Some(pick(o)))), count(pick(current)))
    };
    let rows = vec![
        row("pass", Style::new().fg(Color::Green), |o| o.sessions.pass),
        row("reject", Style::new().fg(Color::Yellow), |o| o.sessions.reject),
        row("ban", Style::new().fg(Color::Red), |o| o.sessions.ban),
        row("no HELO", Style::new(), |o| o.sessions.none),
    ];
    frame.render_widget(counter_table(" Sessions ", rows), area);
}

fn draw_bans(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let (previous, current) = (screen.previous, screen.current);
    let row = |name, pick: fn(&Overview) -> u64| {
        let per_second = rate(per_second(previous, current, |o| Some(pick(o))));
        (name, Style::new(), per_second, count(pick(current)))
    };
    let rows = vec![
        row("added", |o| o.bans.added),
        row("expired", |o| o.bans.expired),
        ("queued", Style::new(), String::new(), count(current.bans.queued)),
        ("active", HEADER, String::new(), count(current.bans.active)),
    ];
    frame.render_widget(counter_table(" Bans ", rows), area);
}

fn draw_kernel(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    use helo_common::Stat;
    let (previous, current) = (screen.previous, screen.current);
    let row = |name, style, stat: Stat| {
        let pick = |o: &Overview| o.xdp.as_ref().map(|x| x.get(stat));
        let total = pick(current).map_or("-".to_owned(), count);
        (name, style, rate(per_second(previous, current, pick)), total)
    };
    // With steering in use, its two outcomes that matter take the rows of the rare ones: new
    // connections handed to the agent, and those sent straight to the MTA on a pass.
    let steering = current.xdp.as_ref().is_some_and(|x| Stat::STEER.iter().any(|s| x.get(*s) > 0));
    let rows = if steering {
        vec![
            row("dropped", Style::new().fg(Color::Red), Stat::Dropped),
            row("passed", Style::new(), Stat::Passed),
            row("judged", Style::new(), Stat::Steered),
            row("straight", Style::new().fg(Color::Green), Stat::SteerPassed),
        ]
    } else {
        vec![
            row("dropped", Style::new().fg(Color::Red), Stat::Dropped),
            row("passed", Style::new(), Stat::Passed),
            row("allowed", Style::new(), Stat::Allowlisted),
            row("parse err", Style::new(), Stat::ParseError),
        ]
    };
    let title = match (&current.xdp, steering) {
        (None, _) => " Kernel: unread ",
        (Some(_), true) => " Kernel (XDP, steering) ",
        (Some(_), false) => " Kernel (XDP) ",
    };
    frame.render_widget(counter_table(title, rows), area);
}

fn draw_helos(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let current = screen.current;
    // Borders, spacing and the three number columns.
    let name_width = usize::from(area.width).saturating_sub(2 + 3 + 6 + 6 + 14).max(8);
    let rows = current.top_helos.iter().map(|row| {
        let rule = row.rules.first().map_or("", |r| r.rule.as_str());
        let style = if row.rejected > 0 { Style::new().fg(Color::Yellow) } else { Style::new() };
        Row::new(vec![
            Line::from(printable(&row.helo, name_width)),
            Line::from(count(row.sessions)).right_aligned(),
            Line::from(count(row.rejected)).right_aligned(),
            Line::from(rule.to_owned()),
        ])
        .style(style)
    });
    let table = Table::new(
        rows,
        [Constraint::Min(8), Constraint::Length(6), Constraint::Length(6), Constraint::Length(14)],
    )
    .header(
        Row::new(vec![
            Line::from("HELO"),
            Line::from("sess").right_aligned(),
            Line::from("rej").right_aligned(),
            Line::from("rule"),
        ])
        .style(DIM),
    )
    .block(Block::bordered().title(format!(" Top HELOs, last {} ", since(current))));
    frame.render_widget(table, area);
}

fn draw_rules(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let current = screen.current;
    let rows = current.top_rules.iter().map(|rule| {
        Row::new(vec![
            Line::from(rule.rule.clone()),
            Line::from(count(rule.sessions)).right_aligned(),
        ])
    });
    let table = Table::new(rows, [Constraint::Min(8), Constraint::Length(6)])
        .header(
            Row::new(vec![Line::from("rejected by"), Line::from("sess").right_aligned()])
                .style(DIM),
        )
        .block(Block::bordered().title(format!(" Rules, {} ", since(current))));
    frame.render_widget(table, area);
}

fn since(overview: &Overview) -> String {
    crate::duration::format(std::time::Duration::from_secs(overview.since_secs))
}

fn draw_services(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let (previous, current) = (screen.previous, screen.current);
    let policy = match current.policy.listeners.as_slice() {
        [] => Line::from(vec![Span::styled("policy ", HEADER), Span::styled("off", DIM)]),
        listeners => Line::from(vec![
            Span::styled("policy ", HEADER),
            Span::raw(format!("on {} ", listeners.join(", "))),
            Span::styled("(its sessions count above)", DIM),
        ]),
    };
    let fleet = match &current.fleet {
        None => Line::from(vec![Span::styled("fleet  ", HEADER), Span::styled("off", DIM)]),
        Some(fleet) => {
            let counter = |name: &str, pick: fn(&Overview) -> Option<u64>| {
                let total = pick(current).unwrap_or(0);
                let per_second = rate(per_second(previous, current, pick));
                format!("  {name} {} ({per_second}/s)", count(total))
            };
            let (state, style) = if fleet.connected {
                ("connected", Style::new().fg(Color::Green))
            } else {
                ("disconnected", Style::new().fg(Color::Red))
            };
            let mut spans = vec![
                Span::styled("fleet  ", HEADER),
                Span::styled(state, style),
                Span::raw(counter("published", |o| o.fleet.as_ref().map(|f| f.published))),
                Span::raw(counter("applied", |o| o.fleet.as_ref().map(|f| f.applied))),
                Span::raw(format!("  refused {}", count(fleet.refused))),
            ];
            if fleet.outbox > 0 {
                spans.push(Span::styled(
                    format!("  waiting {}", count(fleet.outbox)),
                    Style::new().fg(Color::Yellow),
                ));
            }
            Line::from(spans)
        }
    };
    let mut lines = vec![policy, fleet];
    if let Some(fleet) = &current.fleet {
        lines.push(redis_line(fleet, crate::clock::unix_ns() / 1_000_000_000));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

/// The Redis master written to, and when this gateway last saw it change (`now`: Unix
/// seconds).
fn redis_line(fleet: &crate::control::FleetState, now: u64) -> Line<'static> {
    let mut spans = vec![
        Span::raw("       "),
        Span::raw(format!("master {}", fleet.master.as_deref().unwrap_or("-"))),
    ];
    match fleet.last_failover_secs {
        Some(at) => {
            let ago =
                crate::duration::format(std::time::Duration::from_secs(now.saturating_sub(at)));
            spans.push(Span::styled(
                format!("  last failover {ago} ago"),
                Style::new().fg(Color::Yellow),
            ));
        }
        None => spans.push(Span::styled("  no failover seen", DIM)),
    }
    Line::from(spans)
}

fn draw_status(frame: &mut Frame<'_>, area: Rect, screen: &Screen<'_>) {
    let line = match screen.error {
        Some(error) => Line::from(vec![
            Span::styled("agent not answering: ", Style::new().fg(Color::Red)),
            Span::raw(format!("{error}; showing the last answer, retrying")),
        ]),
        None => {
            let over = match screen.previous {
                Some(previous) => {
                    let ms = screen.current.at_ms.saturating_sub(previous.at_ms);
                    format!("rates over {:.1}s", ms as f64 / 1000.0)
                }
                None => "rates from the next refresh".to_owned(),
            };
            Line::from(vec![Span::styled(over, DIM), Span::raw("  q: quit")])
        }
    };
    frame.render_widget(Paragraph::new(line), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BanCounts, FleetState, PolicyState, Verdicts, XdpStats};
    use crate::report::{HeloRow, RuleCount};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn overview(at_ms: u64) -> Overview {
        Overview {
            at_ms,
            sessions: Verdicts::default(),
            sessions_open: 0,
            bans: BanCounts::default(),
            xdp: Some(XdpStats([0; helo_common::STAT_COUNT as usize])),
            since_secs: 300,
            top_helos: Vec::new(),
            top_rules: Vec::new(),
            policy: PolicyState::default(),
            fleet: None,
        }
    }

    fn helo(name: &str, sessions: u64, rule: Option<&str>) -> HeloRow {
        let rules: Vec<RuleCount> =
            rule.map(|r| RuleCount { rule: r.into(), sessions }).into_iter().collect();
        HeloRow {
            helo: name.into(),
            sessions,
            clients: 1,
            clients_capped: false,
            rejected: if rules.is_empty() { 0 } else { sessions },
            rules,
            networks: 1,
            networks_capped: false,
            reused: false,
        }
    }

    /// The screen as text, one string per line, trailing blanks cut.
    fn render(screen: &Screen<'_>, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, screen)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                let line: String = (0..width).map(|x| buffer[(x, y)].symbol()).collect();
                line.trim_end().to_owned()
            })
            .collect()
    }

    /// The words of a line, box borders left out.
    fn words(line: &str) -> Vec<&str> {
        line.split([' ', '│']).filter(|w| !w.is_empty()).collect()
    }

    /// The two words after `word` on its line: a counter's rate and total.
    fn after<'a>(lines: &'a [String], word: &str) -> Vec<&'a str> {
        let words = words(line_with(lines, word));
        let at = words.iter().position(|w| *w == word).expect("the word");
        words[at + 1..].iter().take(2).copied().collect()
    }

    fn text_has(lines: &[String], text: &str) -> bool {
        lines.iter().any(|l| l.contains(text))
    }

    fn line_with<'a>(lines: &'a [String], text: &str) -> &'a str {
        lines.iter().find(|l| l.contains(text)).unwrap_or_else(|| {
            panic!("no line has {text:?}:\n{}", lines.join("\n"));
        })
    }

    #[test]
    fn rates_are_deltas_over_the_agents_clock() {
        let mut before = overview(10_000);
        let mut after = overview(12_000);
        before.sessions.pass = 100;
        after.sessions.pass = 130;
        let pass = |o: &Overview| Some(o.sessions.pass);
        assert_eq!(per_second(Some(&before), &after, pass), Some(15.0));
        assert_eq!(per_second(None, &after, pass), None, "no rate from one snapshot");
        assert_eq!(per_second(Some(&after), &after, pass), None, "no time between them");
        after.sessions.pass = 3;
        assert_eq!(per_second(Some(&before), &after, pass), None, "the agent restarted");
        let dropped = |o: &Overview| o.xdp.as_ref().map(|x| x.get(helo_common::Stat::Dropped));
        after.xdp = None;
        assert_eq!(per_second(Some(&before), &after, dropped), None, "the map was not read");
        let earlier = overview(11_000);
        assert_eq!(per_second(Some(&earlier), &before, pass), None, "the clock went back");
    }

    #[test]
    fn numbers_fit_their_columns() {
        let counts = [0, 9_999, 10_000, 123_456, 999_999, 1_234_567, 987_654_321_000];
        assert_eq!(counts.map(count), ["0", "9999", "10.0k", "123k", "1000k", "1.2M", "988G"]);
        let rates = [None, Some(0.0), Some(0.25), Some(12.34), Some(340.0), Some(12_345.0)];
        assert_eq!(rates.map(rate), ["-", "0", "0.2", "12.3", "340", "12.3k"]);
        for n in counts {
            assert!(count(n).len() <= 6, "{n}");
        }
    }

    #[test]
    fn a_bots_helo_cannot_write_to_the_terminal() {
        assert_eq!(printable("evil\x1b]0;owned\x07.example", 40), "evil?]0;owned?.example");
        assert_eq!(printable("a-very-long-helo-name.example.com", 10), "a-very-lo~");
        assert_eq!(printable("short", 10), "short");
    }

    #[test]
    fn fits_80x24_with_rates_totals_tops_and_services() {
        let mut before = overview(60_000);
        let mut now = overview(61_000);
        before.sessions = Verdicts { pass: 10, reject: 5, ban: 1, none: 0 };
        now.sessions = Verdicts { pass: 13, reject: 7, ban: 2, none: 1 };
        now.sessions_open = 4;
        before.bans = BanCounts { added: 1, expired: 0, queued: 0, active: 1 };
        now.bans = BanCounts { added: 2, expired: 1, queued: 0, active: 1 };
        let mut xdp = [0; helo_common::STAT_COUNT as usize];
        xdp[helo_common::Stat::Dropped as usize] = 40;
        before.xdp = Some(XdpStats(xdp));
        xdp[helo_common::Stat::Dropped as usize] = 52;
        now.xdp = Some(XdpStats(xdp));
        now.top_helos = vec![
            helo("mail.example.com", 13, None),
            helo("friend", 7, Some("no_dot")),
            helo("a-very-long-helo-name-from-a-bot.dyn.example.net", 2, Some("badhelo")),
        ];
        now.top_rules = vec![
            RuleCount { rule: "no_dot".into(), sessions: 7 },
            RuleCount { rule: "forged_identity".into(), sessions: 2 },
        ];
        now.policy.listeners = vec!["127.0.0.1:10040".into()];
        let ago = crate::clock::unix_ns() / 1_000_000_000 - 180;
        now.fleet = Some(FleetState {
            connected: true,
            published: 3,
            applied: 9,
            refused: 1,
            master: Some("10.0.0.6:6379".into()),
            last_failover_secs: Some(ago),
            ..FleetState::default()
        });
        before.fleet =
            Some(FleetState { connected: true, published: 1, applied: 9, ..FleetState::default() });
        let screen = Screen {
            previous: Some(&before),
            current: &now,
            socket: "/run/helo-filter/control.sock",
            error: None,
        };
        let lines = render(&screen, 80, 24);
        let text = lines.join("\n");
        assert!(lines.iter().all(|l| l.chars().count() <= 80));
        assert!(lines[0].contains("/run/helo-filter/control.sock"), "{text}");
        assert!(lines[0].contains("open sessions: 4"), "{text}");
        // Three boxes side by side: rate per second, then the total.
        assert_eq!(words(line_with(&lines, "pass"))[..3], ["pass", "3.0", "13"], "{text}");
        assert_eq!(words(line_with(&lines, "reject"))[..3], ["reject", "2.0", "7"], "{text}");
        assert!(line_with(&lines, "dropped").contains("12.0"), "{text}");
        assert!(line_with(&lines, "dropped").contains("52"), "{text}");
        assert_eq!(words(line_with(&lines, "ban "))[..3], ["ban", "1.0", "2"], "{text}");
        assert!(line_with(&lines, "expired").contains("1.0"), "{text}");
        assert_eq!(after(&lines, "active")[0], "1", "no rate for a gauge:\n{text}");
        assert_eq!(after(&lines, "dropped"), ["12.0", "52"], "{text}");
        // The tops.
        assert!(text.contains("Top HELOs, last 5m"), "{text}");
        let friend = line_with(&lines, "friend");
        assert!(friend.contains("no_dot") && friend.contains(" 7 "), "{friend}");
        assert!(line_with(&lines, "a-very-long-helo").contains('~'), "cut:\n{text}");
        assert!(line_with(&lines, "forged_identity").contains('2'), "{text}");
        // The services and the status line.
        assert!(line_with(&lines, "policy").contains("127.0.0.1:10040"), "{text}");
        let fleet = line_with(&lines, "fleet");
        assert!(fleet.contains("connected") && fleet.contains("published 3 (2.0/s)"), "{fleet}");
        let master = line_with(&lines, "master");
        assert!(master.contains("10.0.0.6:6379"), "{master}");
        assert!(master.contains("last failover 3m"), "{master}");
        assert!(lines[23].contains("q: quit"), "{text}");
    }

    /// With steering in use, the kernel box shows where new connections went: to the agent,
    /// or straight to the MTA on a pass.
    #[test]
    fn the_kernel_box_shows_steering_once_it_steers() {
        use helo_common::Stat;
        let before = overview(60_000);
        let mut now = overview(61_000);
        let mut xdp = [0; helo_common::STAT_COUNT as usize];
        xdp[Stat::Steered as usize] = 30;
        xdp[Stat::SteerPassed as usize] = 270;
        now.xdp = Some(XdpStats(xdp));
        let mut was = [0; helo_common::STAT_COUNT as usize];
        was[Stat::Steered as usize] = 20;
        was[Stat::SteerPassed as usize] = 170;
        let before = Overview { xdp: Some(XdpStats(was)), ..before };
        let screen = Screen { previous: Some(&before), current: &now, socket: "/s", error: None };
        let lines = render(&screen, 80, 24);
        let text = lines.join("\n");
        assert!(text.contains("Kernel (XDP, steering)"), "{text}");
        assert_eq!(after(&lines, "judged"), ["10.0", "30"], "{text}");
        assert_eq!(after(&lines, "straight"), ["100", "270"], "{text}");
    }

    #[test]
    fn the_first_screen_has_totals_but_no_rates_and_an_error_is_shown() {
        let mut now = overview(1_000);
        now.sessions.pass = 5;
        now.xdp = None;
        let screen = Screen { previous: None, current: &now, socket: "/s", error: None };
        let lines = render(&screen, 80, 24);
        assert_eq!(words(line_with(&lines, "pass"))[..3], ["pass", "-", "5"], "{lines:#?}");
        assert!(text_has(&lines, "Kernel: unread"));
        assert_eq!(after(&lines, "dropped"), ["-", "-"], "{lines:#?}");
        assert!(line_with(&lines, "policy").contains("off"));
        assert!(line_with(&lines, "fleet").contains("off"));
        let screen = Screen { error: Some("no agent is running at /s"), ..screen };
        let lines = render(&screen, 80, 24);
        assert!(lines[23].starts_with("agent not answering: no agent is running at /s"));
    }

    #[test]
    fn a_small_or_large_terminal_does_not_panic() {
        let now = overview(1_000);
        let screen = Screen { previous: None, current: &now, socket: "/s", error: None };
        for (width, height) in [(1, 1), (20, 5), (40, 10), (200, 60)] {
            render(&screen, width, height);
        }
    }
}
