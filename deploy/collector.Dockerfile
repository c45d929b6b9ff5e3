# The collector image (SQLite is bundled; the web UI is built into the binary).
# docker build -f deploy/collector.Dockerfile -t profiler-collector:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p profiler-collector

FROM debian:bookworm-slim
COPY --from=build /src/target/release/profiler-collector /usr/local/bin/profiler-collector
USER 65532:65532
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/profiler-collector"]
CMD ["--config", "/etc/profiler/collector.toml"]
