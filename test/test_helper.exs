# Fail fast when the NIF did not load: every test would fail with :nif_not_loaded otherwise.
case Code.ensure_loaded(Ottla.Native) do
  {:module, _} ->
    :ok

  {:error, reason} ->
    raise "Ottla's NIF did not load (#{inspect(reason)}); run `mix compile` and read its output"
end

# The suite runs against a real Kafka broker (scripts/test starts one).
endpoints = Ottla.TestSupport.endpoints()

case Ottla.list_topics(endpoints, timeout: 10_000) do
  {:ok, _} ->
    :ok

  {:error, error} ->
    raise """
    no Kafka broker answers at #{endpoints}: #{Exception.message(error)}
    Run the suite with scripts/test (it starts one), or start one with scripts/kafka start.
    """
end

# Tests tagged :cluster need the 3-broker cluster, and those tagged :secure the broker with
# TLS and SASL listeners; scripts/test starts both.
# Tests tagged :outage (the single broker) and :fault (the cluster) stop and start brokers
# with scripts/kafka, so they need brokers it runs, at the endpoints the suite uses.
controlled = fn mode_args, endpoints ->
  {_, status} =
    System.cmd(Path.expand("scripts/kafka"), ["status" | mode_args], stderr_to_stdout: true)

  {ours, _} =
    System.cmd(Path.expand("scripts/kafka"), ["endpoints" | mode_args], stderr_to_stdout: true)

  if status == 0 and endpoints != nil and String.trim(ours) == endpoints, do: endpoints
end

exclude =
  [
    cluster: System.get_env("OTTLA_KAFKA_CLUSTER_ENDPOINTS"),
    secure: System.get_env("OTTLA_KAFKA_SECURE_ENV"),
    outage: controlled.([], endpoints),
    fault: controlled.(["--cluster"], System.get_env("OTTLA_KAFKA_CLUSTER_ENDPOINTS"))
  ]
  |> Enum.filter(fn {_tag, env} -> is_nil(env) end)
  |> Enum.map(fn {tag, _env} -> tag end)

ExUnit.start(capture_log: true, exclude: exclude)
