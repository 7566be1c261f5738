//! Transparent mode end to end: client, gateway and MTA in three namespaces. The agent on the
//! gateway connects to the MTA from the client's own address (IP_TRANSPARENT), with the usual
//! return-path recipe on the gateway (policy routing of marked packets to the local table, an
//! nftables `socket transparent` mark). The MTA must see the real client, with no PROXY header.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use tests::netns::{Netns, veth};
use tests::{AgentProcess, PinDir, require_root, run};

const CLIENT: &str = "198.51.100.2";
const GW_CLIENT_SIDE: &str = "198.51.100.1";
const GW_MTA_SIDE: &str = "203.0.113.1";
const MTA: &str = "203.0.113.25";

#[test]
fn the_mta_sees_the_real_client_address() {
    require_root();
    let client = Netns::new("hftc");
    let gateway = Netns::new("hftg");
    let mta = Netns::new("hftm");
    let (gw_client_if, client_if) = veth(&gateway, &client);
    let (gw_mta_if, mta_if) = veth(&gateway, &mta);
    gateway.ip(&["addr", "add", &format!("{GW_CLIENT_SIDE}/24"), "dev", &gw_client_if]);
    gateway.ip(&["addr", "add", &format!("{GW_MTA_SIDE}/24"), "dev", &gw_mta_if]);
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", &client_if]);
    mta.ip(&["addr", "add", &format!("{MTA}/24"), "dev", &mta_if]);
    mta.ip(&["route", "add", "default", "via", GW_MTA_SIDE]);
    // Replies to the client's address come back to the gateway: deliver them locally.
    gateway.ip(&["rule", "add", "fwmark", "1", "lookup", "100"]);
    gateway.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]);
    let nft = |args: &[&str]| {
        run(Command::new("ip").args(["netns", "exec", &gateway.name, "nft"]).args(args))
    };
    nft(&["add", "table", "ip", "helo_tproxy"]);
    nft(&[
        "add",
        "chain",
        "ip",
        "helo_tproxy",
        "pre",
        "{ type filter hook prerouting priority mangle; }",
    ]);
    nft(&[
        "add",
        "rule",
        "ip",
        "helo_tproxy",
        "pre",
        "meta",
        "l4proto",
        "tcp",
        "socket",
        "transparent",
        "1",
        "meta",
        "mark",
        "set",
        "1",
    ]);

    // The MTA: greets, answers one command, reports the peer it saw and the first bytes, and
    // answers QUIT with 221 (closing without it would be an MTA lost mid-session).
    let (seen_tx, seen_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let _mta_thread = mta.spawn(move || {
        let listener = TcpListener::bind(format!("{MTA}:25")).unwrap();
        ready_tx.send(()).unwrap();
        let (mut stream, peer) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(b"220 mta.test ESMTP\r\n").unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        stream.write_all(b"250 mta.test\r\n").unwrap();
        seen_tx.send((peer, line)).unwrap();
        let mut quit = String::new();
        if reader.read_line(&mut quit).is_ok() && quit.starts_with("QUIT") {
            let _ = stream.write_all(b"221 mta.test\r\n");
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let pin_dir = PinDir::new();
    let config = pin_dir.config("[proxy]\nhostname = \"gw.test\"\n");
    let prefix = gateway.exec_prefix();
    let gateway_name = gateway.name.clone();
    let _agent = AgentProcess::start(
        &prefix.each_ref().map(String::as_str),
        &[
            "--config",
            config.to_str().unwrap(),
            "--pin-dir",
            pin_dir.path().to_str().unwrap(),
            "run",
            "--iface",
            &gw_client_if,
            "--xdp-mode",
            "native",
            "--listen",
            &format!("{GW_CLIENT_SIDE}:25"),
            "--upstream",
            &format!("{MTA}:25"),
            "--proxy-protocol",
            "transparent",
        ],
        move || {
            let out = Command::new("ip")
                .args(["netns", "exec", &gateway_name, "ss", "-ltn"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(&format!("{GW_CLIENT_SIDE}:25"))
        },
    );

    let transcript = client.enter(|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let dst: SocketAddr = format!("{GW_CLIENT_SIDE}:25").parse().unwrap();
        socket.connect_timeout(&dst.into(), Duration::from_secs(2)).unwrap();
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        let mut transcript = String::from_utf8_lossy(&buf[..n]).into_owned();
        stream.write_all(b"EHLO mail.sender.example\r\n").unwrap();
        let n = stream.read(&mut buf).unwrap();
        transcript.push_str(&String::from_utf8_lossy(&buf[..n]));
        stream.write_all(b"QUIT\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        transcript.push_str(&String::from_utf8_lossy(&rest));
        transcript
    });
    // The proxy greets; the MTA, connected once the HELO passed, answers the EHLO.
    assert_eq!(
        transcript, "220 gw.test ESMTP\r\n250 mta.test\r\n221 mta.test\r\n",
        "the MTA's replies to EHLO and QUIT"
    );
    let (peer, first) = seen_rx.recv_timeout(Duration::from_secs(5)).expect("the MTA was reached");
    assert_eq!(peer.ip().to_string(), CLIENT, "the MTA sees the client's own address");
    assert_eq!(first, "EHLO mail.sender.example\r\n", "no PROXY header before the HELO");
}
