defmodule Ottla.ConsumerPanicTest do
  use ExUnit.Case, async: false

  import Ottla.TestSupport

  @moduletag timeout: 180_000

  defp produce_range!(topic, label, range) do
    messages = for i <- range, do: %{key: "k#{i}", value: "#{label}-#{i}"}

    by_partition =
      Enum.group_by(messages, fn %{key: "k" <> i} -> rem(String.to_integer(i), 2) end)

    for {partition, list} <- by_partition do
      assert :ok == Ottla.produce(endpoints(), topic, list, partition: partition)
    end
  end

  # Every message, in delivery order per partition: partition => [{offset, value}].
  defp collect_values(done?, acc \\ %{}) do
    if done?.(acc) do
      acc
    else
      receive do
        {:batch, _pid, _topic, partition, messages} ->
          pairs = Enum.map(messages, &{&1.offset, &1.value})
          collect_values(done?, Map.update(acc, partition, pairs, &(&1 ++ pairs)))
      after
        60_000 ->
          flunk(
            "no batch within 60 s; delivered so far: #{inspect(Map.new(acc, fn {p, l} -> {p, length(l)} end))}"
          )
      end
    end
  end

  defp distinct(acc), do: acc |> Map.values() |> List.flatten() |> Enum.uniq() |> length()

  test "a panic on the consumer's poll thread restarts the consumer and loses nothing" do
    topic = create_topic!(partitions: 2)
    group = group_name()
    produce_range!(topic, "before", 0..39)

    conn = start_group!(topic, group)
    before = collect_values(&(distinct(&1) >= 40))
    old = Ottla.Group.Manager.resource(conn)
    assert old != nil

    # Test-only NIF: the poll thread panics at its next turn. The panic is caught, the manager
    # hears of it and stops; its supervisor starts a new consumer, which rejoins the group and
    # goes on from the committed offsets.
    assert :ok == Ottla.Native.consumer_test_panic(old)

    wait_until(
      fn -> (new = Ottla.Group.Manager.resource(conn)) && new != old end,
      60_000,
      "a new consumer after the panic"
    )

    produce_range!(topic, "after", 40..79)
    all = collect_values(&(distinct(&1) >= 80), before)

    for partition <- [0, 1] do
      delivered = Map.get(all, partition, [])
      # At least once: a message acked but not yet committed when the consumer went down may
      # come again; the first delivery of each offset is in offset order, without gaps.
      first = Enum.uniq_by(delivered, &elem(&1, 0))
      offsets = Enum.map(first, &elem(&1, 0))

      assert offsets == Enum.to_list(0..39),
             "partition #{partition}: first deliveries #{inspect(offsets)}, expected 0..39"

      expected =
        for i <- 0..79,
            rem(i, 2) == partition,
            do: if(i < 40, do: "before-#{i}", else: "after-#{i}")

      assert Enum.map(first, &elem(&1, 1)) == expected

      # Each delivery (and redelivery) runs forward: a batch never goes back within itself.
      assert Enum.all?(Enum.chunk_every(delivered, 2, 1, :discard), fn [{a, _}, {b, _}] ->
               b == a + 1 or b <= a
             end),
             "partition #{partition}: delivered out of order: #{inspect(Enum.map(delivered, &elem(&1, 0)))}"
    end
  end
end
