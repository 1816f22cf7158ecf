#!/usr/bin/env bash
# The real engines the tests run augment on, into .venv/engines/ (see engines/README.md):
# MinIO (object store), Apache Spark (from pyspark), Beam's Spark job server (built by Maven).
# Idempotent: each part is skipped when present. Needs Go, Java 17, Maven and Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=.venv/engines
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c  # `@latest` on 2026-11-27 (MinIO tags are not semver)
PYSPARK_VERSION=3.5.9                              # Spark 3.5: what beam-runners-spark-3 runs on
mkdir -p "$ENGINES/bin"

if [ ! -x "$ENGINES/bin/minio" ]; then
    echo "engines: building MinIO $MINIO_VERSION (a few minutes)"
    GOBIN="$PWD/$ENGINES/bin" go install "github.com/minio/minio@$MINIO_VERSION"
fi

if [ ! -x "$ENGINES/spark/bin/python" ]; then
    echo "engines: pyspark $PYSPARK_VERSION"
    "$(command -v python3.11 || command -v python3)" -m venv "$ENGINES/spark"
    "$ENGINES/spark/bin/python" -m pip install --quiet "pyspark==$PYSPARK_VERSION"
fi

JAR="$ENGINES/beam-spark-jobserver.jar"
if [ ! -f "$JAR" ] || [ engines/spark-jobserver/pom.xml -nt "$JAR" ]; then
    echo "engines: Beam's Spark job server (Maven)"
    mvn -B -q -f engines/spark-jobserver/pom.xml package
    cp engines/spark-jobserver/target/beam-spark3-jobserver-*-nospark.jar "$JAR"
    rm -rf engines/spark-jobserver/target
fi
echo "engines: ready in $ENGINES"
