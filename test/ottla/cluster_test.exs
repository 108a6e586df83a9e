defmodule Ottla.ClusterTest do
  # Against the 3-broker cluster (scripts/test starts it; OTTLA_KAFKA_CLUSTER_ENDPOINTS).
  use ExUnit.Case, async: true

  @moduletag :cluster
  @moduletag timeout: 300_000

  defp cluster, do: System.fetch_env!("OTTLA_KAFKA_CLUSTER_ENDPOINTS")

  test "a produce right after create_topic succeeds, 50 times out of 50" do
    results =
      for i <- 1..50 do
        topic = "ottla-cluster-#{System.unique_integer([:positive])}-#{i}"
        :ok = Ottla.create_topic(cluster(), topic, partitions: 3, replicas: 3, timeout: 30_000)
        result = Ottla.produce(cluster(), topic, [{"k#{i}", "v"}, {"other", "w"}])
        {topic, result}
      end

    failed = Enum.reject(results, fn {_, result} -> result == :ok end)
    assert failed == [], "#{length(failed)} of 50 failed: #{inspect(Enum.take(failed, 3))}"
  end
end
