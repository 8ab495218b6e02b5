//! The `burrow-edge` binary with a standard output nobody reads.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sends one request head on a new connection and returns the status line of the answer.
fn status_line(addr: &str, head: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(head.as_bytes())?;
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn a_reader_of_the_edges_log_that_stops_reading_never_stalls_the_visitors() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-standalone-token-for-this-test\n").unwrap();
    let mut edge = Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
        .args([
            "--name",
            "logs",
            "--domain",
            "localhost",
            "--agent-plaintext",
        ])
        .args(["--http", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0", "--standalone-token-file"])
        .arg(&token)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read standard output only up to the line that names the visitor listener, then never
    // (the reader is kept open, unread, until the end).
    let stdout = edge.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let http = line
                .split("http=Some(")
                .nth(1)
                .and_then(|rest| rest.split(')').next());
            if let Some(http) = http {
                let _ = tx.send((http.to_owned(), out));
                return;
            }
        }
    });
    let (http, out) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the edge never logged its visitor listener");
    // Each refused CONNECT logs a line of about 150 bytes: 1,500 of them are well past a
    // pipe's 64 KiB.
    let started = Instant::now();
    for i in 0..1500 {
        let status = status_line(
            &http,
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        );
        assert!(
            matches!(&status, Ok(s) if s.starts_with("HTTP/1.1 501")),
            "refused CONNECT {i} got {status:?}"
        );
    }
    let status = status_line(&http, "GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n").unwrap();
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let _ = edge.kill();
    let _ = edge.wait();
    drop(out);
}

#[test]
fn a_log_queue_length_out_of_range_is_refused_with_the_range() {
    for bad in ["0", "lots", "2000000"] {
        let out = Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
            .args(["--standalone-token-file", "/nonexistent"])
            .env("BURROW_LOG_QUEUE_LINES", bad)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("BURROW_LOG_QUEUE_LINES") && err.contains("from 1 to 1048576"),
            "{bad}: {err}"
        );
    }
}
