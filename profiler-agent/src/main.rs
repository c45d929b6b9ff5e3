fn main() { let o = include_bytes!(concat!(env!("OUT_DIR"), "/profiler")); println!("{}", o.len()); }
