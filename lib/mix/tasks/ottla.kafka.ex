defmodule Mix.Tasks.Ottla.Kafka do
  @shortdoc "Runs a real Apache Kafka (KRaft, from Maven Central) for integration tests"
  @moduledoc """
  Runs Apache Kafka in KRaft mode on 127.0.0.1 for your integration tests, without Docker:
  the broker's jars are resolved from Maven Central with `mvn` once and cached, and the
  brokers run as plain `java` processes. It is the same script Ottla's own test suite uses.

      mix ottla.kafka start              # one broker on 127.0.0.1:9092
      mix ottla.kafka start --cluster    # three brokers on 127.0.0.1:9192-9194
                                         # (replication factor 3, min.insync.replicas 2)
      mix ottla.kafka status [--cluster] # what runs; exits 0 when every broker is up
      mix ottla.kafka endpoints [--cluster]
      mix ottla.kafka stop [--cluster]   # stops the brokers and deletes their data
      mix ottla.kafka stop-broker ID     # --cluster mode: stop broker ID (1-3), keep its data
      mix ottla.kafka start-broker ID    # start it again

  A second `start` while the brokers run does nothing. `start` returns once every broker
  answers.

  ## Prerequisites

  Java 17 or later and Maven (`mvn`) on the `PATH` (Debian: `apt-get install
  openjdk-17-jre-headless maven`), and access to Maven Central.

  ## Where things live

  Nothing is written into your project. Settings, from the environment:

    * `OTTLA_KAFKA_VERSION` - the Kafka version. Defaults to `3.9.1`.
    * `OTTLA_KAFKA_PORT` / `OTTLA_KAFKA_CLUSTER_PORT` - the single broker's port (default
      `9092`), the cluster's first port (default `9192`). Each broker's controller listens
      1000 ports higher.
    * `OTTLA_KAFKA_CACHE` - the jars. Defaults to `~/.cache/ottla/kafka-<version>`.
    * `OTTLA_KAFKA_STATE` - the brokers' data, logs and pid files. Defaults to
      `$TMPDIR/ottla-kafka-<uid>` (`/tmp/…`).
  """
  use Mix.Task

  # Where this file was compiled: the Ottla project's lib/mix/tasks.
  @compiled_root Path.expand("../../..", __DIR__)

  @impl true
  def run(args) do
    script = Path.join(root(), "scripts/kafka")

    unless File.regular?(script),
      do:
        Mix.raise(
          "Ottla's broker script is missing: #{script} (is Ottla a path or git dependency?)"
        )

    bash = System.find_executable("bash") || Mix.raise("mix ottla.kafka needs bash")

    case System.cmd(bash, [script | args], into: IO.stream(), stderr_to_stdout: true) do
      {_, 0} -> :ok
      {_, status} -> exit({:shutdown, status})
    end
  end

  # Ottla's own directory: a dependency's, or this project's when it is Ottla.
  defp root do
    cond do
      path = Mix.Project.deps_paths()[:ottla] -> path
      Mix.Project.config()[:app] == :ottla -> File.cwd!()
      true -> @compiled_root
    end
  end
end
