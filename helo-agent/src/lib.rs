//! helo-agent: the user-space half of helo-filter.
//!
//! Where things are: `cli` parses the command line; `config` reads and validates the TOML and
//! imports qmail and Postfix rule files; `rules` decides a HELO (pure, no I/O; `dns` gathers
//! the DNS facts it may read); `judge` owns what the doors share (the live rules, the court,
//! the resolver, the ban lookups, the memories `reuse` and `passes`) and holds the one hearing
//! every door and `check` drive; `proxy` (the SMTP proxy) and `policy` (Postfix's policy
//! service) are the doors; `smtp` is sans-IO SMTP; `addr` turns addresses into ban keys;
//! `blocklist` decides what a ban is (pure, behind a store trait) and runs the ban worker;
//! `fleet` shares bans with the other gateways through Redis; `ebpf` is the only module that
//! talks to the kernel through aya; `agent` is the `run` loop (`host`: what it reads of the
//! host, the open-file limit and the default route) and `reload` its reloads;
//! `control` the control socket (and `top` the live terminal view over it), `unix` binds it
//! and the policy door's sockets; `metrics` and `report` what is observed; `privilege` the
//! switch to `agent.user`; `clock` and `duration` are the time helpers everything shares.

pub mod addr;
pub mod agent;
pub mod blocklist;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod dns;
pub mod duration;
pub mod ebpf;
pub mod fleet;
pub mod host;
pub mod judge;
pub mod metrics;
pub mod passes;
pub mod policy;
pub mod privilege;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod reuse;
pub mod rules;
pub mod smtp;
#[cfg(test)]
mod testing;
pub mod top;
pub mod unix;
pub mod watchdog;
