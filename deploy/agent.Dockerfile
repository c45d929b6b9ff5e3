# The agent image: the eBPF object is built into the binary (profiler-agent's
# build.rs compiles it with bpf-linker), so the image is one static file set.
# docker build -f deploy/agent.Dockerfile -t profiler-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup component add rust-src \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --locked \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p profiler-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/profiler-agent /usr/local/bin/profiler-agent
ENTRYPOINT ["/usr/local/bin/profiler-agent"]
CMD ["run", "--collector", "http://profiler-collector.profiler.svc:7070", "--plaintext"]
