//! A stand-in for Firecracker in the page server's tests: maps guest memory
//! and hands it to a page server exactly as Firecracker does
//! (`ember_uffd::vmm_side`), then runs a script of steps against that
//! memory and checks every byte it reads against an expected image.
//!
//! ```text
//! ember-uffd-peer --socket PATH --regions SIZE[,SIZE…] --expected FILE
//!                 [--page-size 4096|2097152] [--threads N] [--order seq|random]
//!                 [--overlap] STEP…
//! ```
//!
//! Steps, run in order:
//! - `verify[:OFF:LEN]`  read every page (of the range) from `--threads`
//!   threads in `--order` and compare it with the expected image; with
//!   `--overlap` every thread reads every page (racing faults on one page)
//! - `touch-list:FILE`   read the pages whose image offsets FILE lists
//!   (one decimal per line), in that order, and verify them
//! - `discard:OFF:LEN`   `madvise(MADV_DONTNEED)`; the range reads as zeros after
//! - `write:OFF:LEN`     write one byte to each page of the range
//! - `resident:FILE`     wait (up to 10 s) until every page FILE lists is
//!   resident, without touching any; prints `resident N of M`
//! - `hold`              print `holding` and wait for a line on stdin
//! - `exit`              exit 0 at once
//!
//! Exit status 0 when every check passed, 1 (with a message on stderr) when
//! a byte differs.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_uffd::vmm_side::GuestMemory;

struct Args {
    socket: PathBuf,
    regions: Vec<u64>,
    expected: PathBuf,
    page_size: u64,
    threads: usize,
    random: bool,
    overlap: bool,
    steps: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        regions: Vec::new(),
        expected: PathBuf::new(),
        page_size: 4096,
        threads: 1,
        random: false,
        overlap: false,
        steps: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => a.socket = value()?.into(),
            "--expected" => a.expected = value()?.into(),
            "--regions" => {
                a.regions = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("bad region size {s}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--page-size" => {
                a.page_size = value()?
                    .parse()
                    .map_err(|e| format!("bad page size: {e}"))?
            }
            "--threads" => {
                a.threads = value()?
                    .parse()
                    .map_err(|e| format!("bad thread count: {e}"))?
            }
            "--order" => a.random = value()? == "random",
            "--overlap" => a.overlap = true,
            step => a.steps.push(step.to_owned()),
        }
    }
    if a.regions.is_empty() {
        return Err("--regions is required".into());
    }
    Ok(a)
}

/// The image the guest should see: the expected file, with discarded
/// ranges zero and written pages changed.
struct Expected {
    bytes: Vec<u8>,
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ember-uffd-peer: {e}");
            std::process::exit(2);
        }
    };
    let mem = match GuestMemory::new(&args.regions, args.page_size) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("ember-uffd-peer: cannot map guest memory: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = mem.send_handshake(&args.socket) {
        eprintln!("ember-uffd-peer: handshake failed: {e}");
        std::process::exit(2);
    }
    let mut expected = Expected {
        bytes: std::fs::read(&args.expected).unwrap_or_else(|e| {
            eprintln!(
                "ember-uffd-peer: cannot read {}: {e}",
                args.expected.display()
            );
            std::process::exit(2);
        }),
    };
    for step in &args.steps {
        if let Err(e) = run_step(step, &args, &mem, &mut expected) {
            eprintln!("ember-uffd-peer: step {step}: {e}");
            std::process::exit(1);
        }
    }
}

fn nums(step: &str) -> Result<Vec<u64>, String> {
    step.split(':')
        .skip(1)
        .map(|s| s.parse().map_err(|e| format!("bad number {s}: {e}")))
        .collect()
}

fn offsets_in(path: &str) -> Result<Vec<u64>, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {path}: {e}"))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().map_err(|e| format!("bad offset {l}: {e}")))
        .collect()
}

fn run_step(
    step: &str,
    args: &Args,
    mem: &Arc<GuestMemory>,
    expected: &mut Expected,
) -> Result<(), String> {
    let page = 4096u64;
    let kind = step.split(':').next().unwrap_or("");
    match kind {
        "verify" => {
            let n = nums(step)?;
            let (off, len) = if n.len() == 2 {
                (n[0], n[1])
            } else {
                (0, mem.size())
            };
            let mut pages: Vec<u64> = (off / page..(off + len) / page).map(|p| p * page).collect();
            if args.random {
                shuffle(&mut pages, 0x5eed);
            }
            verify_pages(mem, &expected.bytes, &pages, args.threads, args.overlap)
        }
        "touch-list" => {
            let path = step
                .split_once(':')
                .map(|x| x.1)
                .ok_or("touch-list needs a file")?;
            let pages = offsets_in(path)?;
            verify_pages(mem, &expected.bytes, &pages, args.threads, false)
        }
        "discard" => {
            let n = nums(step)?;
            mem.discard(n[0], n[1])
                .map_err(|e| format!("madvise: {e}"))?;
            expected.bytes[n[0] as usize..(n[0] + n[1]) as usize].fill(0);
            Ok(())
        }
        "write" => {
            let n = nums(step)?;
            let mut p = n[0];
            while p < n[0] + n[1] {
                let v = expected.bytes[p as usize].wrapping_add(1);
                mem.write_u8(p, v);
                expected.bytes[p as usize] = v;
                p += page;
            }
            Ok(())
        }
        "resident" => {
            let path = step
                .split_once(':')
                .map(|x| x.1)
                .ok_or("resident needs a file")?;
            let pages = offsets_in(path)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut count;
            loop {
                count = pages.iter().filter(|p| mem.is_resident(**p)).count();
                if count == pages.len() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            println!("resident {count} of {}", pages.len());
            std::io::stdout().flush().ok();
            Ok(())
        }
        "hold" => {
            println!("holding");
            std::io::stdout().flush().ok();
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).ok();
            Ok(())
        }
        "exit" => std::process::exit(0),
        other => Err(format!("unknown step {other}")),
    }
}

fn verify_pages(
    mem: &Arc<GuestMemory>,
    expected: &[u8],
    pages: &[u64],
    threads: usize,
    overlap: bool,
) -> Result<(), String> {
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> Result<(), String> {
                    let mut buf = vec![0u8; 4096];
                    let mine: Vec<u64> = if overlap {
                        pages.to_vec()
                    } else {
                        pages.iter().skip(t).step_by(threads).copied().collect()
                    };
                    for p in mine {
                        mem.read(p, &mut buf);
                        let want = &expected[p as usize..p as usize + 4096];
                        if buf != want {
                            let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                            return Err(format!(
                                "byte at image offset {:#x} is {:#04x}, expected {:#04x}",
                                p + at as u64,
                                buf[at],
                                want[at]
                            ));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| "a touch thread panicked".to_string())?
        })
    })
}

/// A deterministic shuffle (xorshift), so runs are repeatable.
fn shuffle(v: &mut [u64], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
