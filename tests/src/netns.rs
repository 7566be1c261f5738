//! Network namespaces joined by veth pairs, removed on drop, and code run inside a namespace
//! (in a thread that has entered it: `setns` changes the calling thread only).

use std::process::Command;

use crate::run;

/// A named network namespace (`ip netns add`), deleted with everything in it when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = crate::unique(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// The prefix that runs a program inside: `nsenter --net=/var/run/netns/NAME`. Unlike
    /// `ip netns exec` it leaves the mount namespace alone, so the program sees the host's
    /// bpffs and its pins stay visible to the CLI, as on a real gateway.
    pub fn exec_prefix(&self) -> [String; 2] {
        ["nsenter".to_owned(), format!("--net=/var/run/netns/{}", self.name)]
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Starts `f` on a thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        spawn_in(&self.name, f)
    }
}

/// Starts `f` on a thread that has entered the namespace called `name` (by name, for closures
/// that must not borrow the guard, such as readiness checks).
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}

/// Runs `f` inside the namespace called `name` and returns its result.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(name, f).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Creates a veth pair with one end in each namespace, both up; returns the two names.
pub fn veth(a: &Netns, b: &Netns) -> (String, String) {
    let (name_a, name_b) = (crate::unique("hfa"), crate::unique("hfb"));
    run(Command::new("ip").args([
        "link", "add", &name_a, "netns", &a.name, "type", "veth", "peer", "name", &name_b, "netns",
        &b.name,
    ]));
    a.ip(&["link", "set", &name_a, "up"]);
    b.ip(&["link", "set", &name_b, "up"]);
    (name_a, name_b)
}
