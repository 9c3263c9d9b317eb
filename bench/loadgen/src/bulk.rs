//! `bulk`: one large upload, then one large download, each alone through the proxy: the
//! rate, and the proxy's CPU time (user + system, from /proc/PID/stat) per GiB moved.
//!
//! Both go to the loadgen upstream, which reads the upload (`--gib` GiB, 256 KiB writes,
//! `Content-Length`) whole before it answers 200, and sends the download (as many bytes,
//! 256 KiB writes) as fast as the proxy takes it; the client reads it as fast as it can.
//! With `--proxy` set to the upstream's own address (and no `--pid`): the baseline. Where
//! the proxy reads in small pieces it pays a system call and a wake-up per piece; this is
//! what that costs.

use std::time::Instant;

use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::http::{self, HOST};
use crate::upstream::{Mode, Upstream};
use crate::{Args, emit};

const GIB: u64 = 1 << 30;

pub async fn run(args: &Args) -> Result<(), String> {
    let proxy = args.addr("proxy")?;
    let up_addr = args.addr("upstream")?;
    // 0: no proxy in between (the direct baseline): no CPU to read.
    let pid: u32 = args.num("pid", Some(0))?;
    let gib: u64 = args.num("gib", Some(1))?;
    let label = args.str("label", "proxy");
    if gib == 0 || gib > 16 {
        return Err("--gib 1..16".into());
    }
    let bytes = gib * GIB;
    let _up = Upstream::start(up_addr, Mode::Sink).await?;
    let e = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");

    // Upload.
    let cpu0 = cpu_s(pid)?;
    let t = Instant::now();
    let mut s = http::connect(proxy).await.map_err(e("connect"))?;
    let head = format!("POST /c/1 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {bytes}\r\n\r\n");
    http::write_all(&mut s, head.as_bytes())
        .await
        .map_err(e("upload head"))?;
    let block = vec![b'u'; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(block.len() as u64) as usize;
        http::write_all(&mut s, &block[..n])
            .await
            .map_err(e("upload"))?;
        sent += n as u64;
    }
    let mut buf = Vec::new();
    let (status, _) = http::read_response(&mut s, &mut buf)
        .await
        .map_err(e("upload response"))?;
    let up_s = t.elapsed().as_secs_f64();
    let up_cpu = cpu_s(pid)? - cpu0;
    if status != 200 {
        return Err(format!("upload answered {status}"));
    }
    drop(s);

    // Download.
    let cpu0 = cpu_s(pid)?;
    let t = Instant::now();
    let mut s = http::connect(proxy).await.map_err(e("connect"))?;
    let req = format!("GET /c/2?bytes={bytes} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    http::write_all(&mut s, req.as_bytes())
        .await
        .map_err(e("download request"))?;
    let mut buf = Vec::new();
    let head_len = http::read_head(&mut s, &mut buf)
        .await
        .map_err(e("download head"))?
        .ok_or("the download closed before its head")?;
    let head = http::parse_head(&buf[..head_len]).ok_or("unparsable download head")?;
    let len = head
        .content_length
        .ok_or("the download has no Content-Length")? as u64;
    if head.status != 200 {
        return Err(format!("download answered {}", head.status));
    }
    let mut got = (buf.len() - head_len) as u64;
    let mut tmp = vec![0u8; 256 * 1024];
    while got < len {
        let n = s.read(&mut tmp).await.map_err(e("download"))?;
        if n == 0 {
            return Err(format!("download cut short at {got} of {len} bytes"));
        }
        got += n as u64;
    }
    let down_s = t.elapsed().as_secs_f64();
    let down_cpu = cpu_s(pid)? - cpu0;
    let down_gib = len as f64 / GIB as f64;

    println!(
        "bulk {label}: upload {gib} GiB in {up_s:.2} s, proxy CPU {up_cpu:.2} s; \
         download {down_gib:.2} GiB in {down_s:.2} s, proxy CPU {down_cpu:.2} s"
    );
    let per_gib = |cpu: f64, gib: f64| (pid != 0).then(|| round3(cpu / gib));
    emit(json!({
        "bench": "bulk",
        "proxy": label,
        "upload_gib": gib,
        "upload_s": round3(up_s),
        "upload_gib_per_s": round3(gib as f64 / up_s),
        "upload_cpu_s_per_gib": per_gib(up_cpu, gib as f64),
        "download_gib": round3(down_gib),
        "download_s": round3(down_s),
        "download_gib_per_s": round3(down_gib / down_s),
        "download_cpu_s_per_gib": per_gib(down_cpu, down_gib),
    }));
    Ok(())
}

/// A process's CPU time so far (user + system), in seconds; 0 for pid 0.
fn cpu_s(pid: u32) -> Result<f64, String> {
    if pid == 0 {
        return Ok(0.0);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ: 100 on Linux, whatever the kernel's own tick.
    Ok(ticks / 100.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
