defmodule Ottla.ExactlyOnceTest do
  # Exactly-once group consumers against the real broker: a handler's output and the ack of
  # its batch commit in one transaction, so a read_committed reader of the output sees each
  # input's transform once, whatever happens to the workers.
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  @moduletag timeout: 180_000

  defmodule Transform do
    @moduledoc false
    # Writes "T:" <> value for each input, keyed as the input, to `out`. With `fail_first`,
    # a first attempt also writes to a topic that does not exist, so its transaction aborts.
    use Ottla.Consumer.MessageHandler

    def init(args), do: {:ok, args}

    def handle_messages(messages, state) do
      # A handler that takes its time, so that faults land while batches are in flight.
      if state[:delay], do: Process.sleep(state.delay)
      output = for m <- messages, do: {state.out, {m.key, "T:" <> m.value}}

      if state[:fail_first] && attempt() == 1 do
        {:produce, output ++ [{state.missing, "never"}], state}
      else
        {:produce, output, state}
      end
    end
  end

  defp start_pipeline!(input, out, group, extra_args, opts) do
    start_group!(input, group,
      connection: Keyword.get(opts, :connection, conn_name()),
      id: Keyword.get(opts, :id, make_ref()),
      handler: Transform,
      handler_init_args: Map.merge(%{out: out}, extra_args),
      exactly_once: true,
      max_batch: Keyword.get(opts, :max_batch, 50),
      retry_backoff: 50
    )
  end

  defp produce_inputs!(input, count) do
    inputs = for i <- 1..count, do: {"k#{rem(i, 17)}", "v#{i}"}
    :ok = Ottla.produce(endpoints(), input, inputs)
    inputs
  end

  # Everything a read_committed reader sees in `topic`, once `count` messages are there
  # (the markers that make a committed transaction readable follow its commit).
  defp output!(topic, partitions, count) do
    wait_until(
      fn ->
        all = for p <- 0..(partitions - 1), m <- elem(fetch_all!(topic, p), 1), do: m
        length(all) >= count and all
      end,
      60_000,
      "#{count} committed output messages in #{topic}"
    )
  end

  defp assert_once!(inputs, output) do
    values = Enum.map(output, & &1.value)
    expected = Enum.map(inputs, fn {_, v} -> "T:" <> v end)
    duplicates = length(values) - length(Enum.uniq(values))
    missing = expected -- values
    assert {duplicates, missing} == {0, []}
    assert Enum.sort(values) == Enum.sort(expected)

    # Per key (one input partition each), in input order.
    for {key, group} <- Enum.group_by(inputs, &elem(&1, 0)) do
      out = for m <- output, m.key == key, do: m.value
      assert out == Enum.map(group, fn {_, v} -> "T:" <> v end)
    end
  end

  defp assert_committed_to_end!(group, input, partitions) do
    ends = for p <- 0..(partitions - 1), into: %{}, do: {p, elem(fetch_all!(input, p), 0)}

    wait_until(
      fn -> committed(group, input) == ends end,
      30_000,
      "the input committed to its end"
    )
  end

  test "each input's output is committed once, with the input's offsets" do
    input = create_topic!(partitions: 3)
    out = create_topic!(partitions: 3)
    group = group_name()
    inputs = produce_inputs!(input, 600)

    conn = conn_name()
    start_pipeline!(input, out, group, %{}, connection: conn)

    assert_once!(inputs, output!(out, 3, 600))
    assert_committed_to_end!(group, input, 3)
    # Nothing more comes after the commits reached the end.
    assert_once!(inputs, output!(out, 3, 600))

    # A transaction per batch of at most 50: at least 12 for 600 messages.
    assert {:ok, %{transactions_committed: committed, transactions_aborted: 0}} =
             Ottla.stats(conn)

    assert committed >= 12
  end

  test "workers killed again and again and a member joining write no output twice" do
    input = create_topic!(partitions: 4)
    out = create_topic!(partitions: 4)
    group = group_name()
    inputs = produce_inputs!(input, 4_000)
    first = conn_name()
    start_pipeline!(input, out, group, %{delay: 10}, connection: first, max_batch: 20)
    Ottla.Testing.await_assignment(first, timeout: 30_000)

    killer =
      Task.async(fn ->
        Enum.reduce_while(1..400, 0, fn _, kills ->
          Process.sleep(15)
          p = :rand.uniform(4) - 1

          kills =
            case Ottla.Supervisor.whereis_worker(first, input, p) do
              nil -> kills
              pid -> Process.exit(pid, :kill) && kills + 1
            end

          receive do
            :stop -> {:halt, kills}
          after
            0 -> {:cont, kills}
          end
        end)
      end)

    # The second member joins once a quarter of the output is there, while workers die.
    output!(out, 4, 1_000)
    start_pipeline!(input, out, group, %{delay: 10}, max_batch: 20)

    output = output!(out, 4, 4_000)
    send(killer.pid, :stop)
    kills = Task.await(killer, 30_000)
    assert kills > 0
    assert_once!(inputs, output)
    assert_committed_to_end!(group, input, 4)
    assert_once!(inputs, output!(out, 4, 4_000))
  end

  # The worker is killed as soon as its batch's commit is on its way (traced: the call that
  # waits for the commit's answer), so the commit lands while its successor gets the batch.
  test "a worker killed while its transaction commits: its successor writes nothing twice and skips nothing" do
    input = create_topic!(partitions: 2)
    out = create_topic!(partitions: 2)
    group = group_name()
    conn = conn_name()

    Code.ensure_loaded!(Ottla.Transaction)
    assert 1 == :erlang.trace_pattern({Ottla.Transaction, :answer, 4}, true, [:local])
    :erlang.trace(:new_processes, true, [:call])

    on_exit(fn ->
      :erlang.trace_pattern({Ottla.Transaction, :answer, 4}, false, [:local])
    end)

    start_pipeline!(input, out, group, %{}, connection: conn, max_batch: 10)
    Ottla.Testing.await_assignment(conn, timeout: 30_000)

    # Produced a few at a time while the pipeline runs: a first delivery can be shorter than
    # the delivery of the same offsets to the killed worker's successor, which then must
    # handle the offsets after the committed ones, not skip them.
    inputs = for i <- 1..400, do: {"k#{rem(i, 17)}", "v#{i}"}

    producer =
      Task.async(fn ->
        for chunk <- Enum.chunk_every(inputs, 5) do
          :ok = Ottla.produce(endpoints(), input, chunk)
          Process.sleep(5)
        end
      end)

    kills = kill_committing(conn, input, 8)
    Task.await(producer, 60_000)
    :erlang.trace(:new_processes, false, [:call])
    assert kills == 8

    assert_once!(inputs, output!(out, 2, 400))
    assert_committed_to_end!(group, input, 2)
    assert_once!(inputs, output!(out, 2, 400))
  end

  defp kill_committing(conn, input, wanted, kills \\ 0)
  defp kill_committing(_conn, _input, wanted, wanted), do: wanted

  defp kill_committing(conn, input, wanted, kills) do
    receive do
      {:trace, pid, :call, {Ottla.Transaction, :answer, _}} ->
        workers = for p <- 0..1, do: Ottla.Supervisor.whereis_worker(conn, input, p)

        if pid in workers do
          Process.exit(pid, :kill)
          kill_committing(conn, input, wanted, kills + 1)
        else
          kill_committing(conn, input, wanted, kills)
        end
    after
      30_000 -> kills
    end
  end

  test "an aborted transaction's output is never visible, and its batch comes again" do
    input = create_topic!(partitions: 1)
    out = create_topic!(partitions: 1)
    group = group_name()
    inputs = produce_inputs!(input, 30)

    conn = conn_name()

    start_pipeline!(input, out, group, %{fail_first: true, missing: unique_topic("missing")},
      connection: conn
    )

    output = output!(out, 1, 30)
    assert_once!(inputs, output)
    assert_committed_to_end!(group, input, 1)
    assert_once!(inputs, output!(out, 1, 30))
    assert {:ok, %{transactions_aborted: aborted}} = Ottla.stats(conn)
    assert aborted >= 1
  end

  test "options it cannot honour are refused, naming them" do
    base = [group: "g", topics: ["t"], handler: Transform, exactly_once: true]

    start = fn gc ->
      Ottla.Supervisor.start_link(
        connection: conn_name(),
        endpoints: endpoints(),
        group_consumer: gc
      )
    end

    assert_raise ArgumentError, ~r/:offsets/, fn ->
      start.(base ++ [offsets: {:elsewhere, fn _, _ -> nil end}])
    end

    assert_raise ArgumentError, ~r/:on_failure/, fn ->
      start.(base ++ [on_failure: {:dead_letter, "dlq"}])
    end

    assert_raise ArgumentError, ~r/:exactly_once/, fn ->
      start.(Keyword.put(base, :exactly_once, :yes))
    end

    assert_raise ArgumentError, ~r/:transactional_id/, fn ->
      start.(Keyword.put(base, :exactly_once, false) ++ [transactional_id: "x"])
    end
  end

  test "an ack from another process is dropped: a batch is acked only with its transaction" do
    input = create_topic!(partitions: 1)
    out = create_topic!(partitions: 1)
    conn = conn_name()
    start_pipeline!(input, out, group_name(), %{}, connection: conn)
    Ottla.Testing.await_assignment(conn, timeout: 30_000)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        assert :ok = Ottla.Group.Acknowledger.ack(conn, input, 0, 1, 5)
      end)

    assert log =~ "exactly-once"
    assert Ottla.Group.Acknowledger.get_latest_offset(conn, input, 0) == nil
  end
end
