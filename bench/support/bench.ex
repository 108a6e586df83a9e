defmodule Bench do
  @moduledoc false
  # Shared by the scripts in bench/: sizes, the Rust baseline, measurements and tables.
  #
  # Every benchmark runs against the real broker at OTTLA_KAFKA_ENDPOINTS (scripts/bench
  # starts one). BENCH_SMOKE=1 shrinks every workload so that the whole set completes in a
  # few minutes (CI runs it that way: it checks that they run and report, not their figures).

  @value_bytes 100
  @key_bytes 16

  Logger.configure(level: :warning)

  def endpoints, do: System.get_env("OTTLA_KAFKA_ENDPOINTS", "127.0.0.1:9092")
  def smoke?, do: System.get_env("BENCH_SMOKE") in ["1", "true"]

  @doc "`full` normally, `small` with BENCH_SMOKE=1; BENCH_MESSAGES overrides message counts."
  def size(full, small), do: if(smoke?(), do: small, else: full)

  def messages(full, small) do
    case System.get_env("BENCH_MESSAGES") do
      nil -> size(full, small)
      n -> String.to_integer(n)
    end
  end

  def rounds, do: String.to_integer(System.get_env("BENCH_ROUNDS", "#{size(3, 1)}"))
  def value_bytes, do: @value_bytes
  def key_bytes, do: @key_bytes
  def value, do: :binary.copy("x", @value_bytes)
  def key(i), do: String.pad_leading(Integer.to_string(i), @key_bytes, "0")

  def topic(prefix),
    do:
      "ottla-bench-#{prefix}-#{System.system_time(:millisecond)}-#{System.unique_integer([:positive])}"

  def create_topic!(prefix, partitions) do
    topic = topic(prefix)
    :ok = Ottla.create_topic(endpoints(), topic, partitions: partitions, timeout: 60_000)
    topic
  end

  def delete_topic(topic), do: Ottla.delete_topic(endpoints(), topic, timeout: 60_000)

  @doc "Starts connection `name` with a producer; returns the supervisor's pid."
  def start_producer!(name) do
    {:ok, sup} =
      Ottla.Supervisor.start_link(connection: name, endpoints: endpoints(), producer: [])

    sup
  end

  @doc """
  Starts connection `name` with a group consumer of `topic` (a fresh group, from the earliest
  offset) running `handler` with `args`; `options` are more group consumer options. Returns
  the supervisor's pid.
  """
  def start_group!(name, topic, handler, args, options \\ []) do
    {:ok, sup} =
      Ottla.Supervisor.start_link(
        connection: name,
        endpoints: endpoints(),
        group_consumer:
          [
            group:
              "ottla-bench-#{System.unique_integer([:positive])}-#{:rand.uniform(1_000_000)}",
            topics: [topic],
            handler: handler,
            handler_init_args: args,
            begin_offset: :earliest
          ] ++ options
      )

    sup
  end

  @doc "A consumer group name no other run uses."
  def group_name,
    do: "ottla-bench-#{System.unique_integer([:positive])}-#{:rand.uniform(1_000_000)}"

  @doc "The baseline binary (cargo builds it: scripts/bench does)."
  def baseline_path do
    path = Path.expand("../../target/release/ottla-baseline", __DIR__)

    File.exists?(path) ||
      raise "#{path} is missing: build it with `cargo build --release -p ottla_bench`"

    path
  end

  @doc "Runs the Rust baseline; its RESULT line as a map (messages, seconds, cpu_seconds, bytes)."
  def baseline!(args) do
    {out, status} = System.cmd(baseline_path(), Enum.map(args, &to_string/1))

    if status != 0,
      do: raise("ottla-baseline #{Enum.join(args, " ")} failed (#{status}):\n#{out}")

    [line] = for l <- String.split(out, "\n"), String.starts_with?(l, "RESULT "), do: l

    line
    |> String.trim_leading("RESULT ")
    |> String.split()
    |> Map.new(fn pair ->
      [k, v] = String.split(pair, "=")

      {String.to_atom(k),
       if(String.contains?(v, "."), do: String.to_float(v), else: String.to_integer(v))}
    end)
  end

  @doc "Fills `topic` with `n` keyed 100-byte messages through the baseline producer."
  def fill!(topic, n), do: baseline!(["produce", endpoints(), topic, n, 4, 1000])

  @doc "The same with values of `value_bytes` bytes (calls of fewer messages when they are large)."
  def fill!(topic, n, value_bytes) do
    call = max(1, min(1000, div(8_000_000, value_bytes + 16)))
    baseline!(["produce", endpoints(), topic, n, 4, call, value_bytes])
  end

  @doc """
  Produces `total` keyed messages to `topic` through connection `conn` from `procs`
  processes, in calls of `call` messages; returns `{seconds, cpu_seconds}` of the sending.
  Each process builds its message lists before the clocks start, so they measure Ottla.
  """
  def produce_with_ottla(conn, topic, total, procs, call, opts \\ []) do
    value = value()
    parent = self()
    # Without prebuilt lists each call's list is built just before it (the schedulers
    # benchmark: large prebuilt heaps make garbage collections that are not Ottla's).
    prebuilt? = Keyword.get(opts, :prebuilt, true)
    # `by_process: true`: process p sends to partition p - 1 (else the key places each message).
    by_process? = Keyword.get(opts, :by_process, false)

    tasks =
      Enum.map(1..procs, fn p ->
        share = div(total, procs) + if(p <= rem(total, procs), do: 1, else: 0)

        Task.async(fn ->
          calls =
            (p * 10_000_000)
            |> Stream.iterate(&(&1 + 1))
            |> Stream.take(share)
            |> Stream.chunk_every(call)
            |> Stream.map(fn keys -> Enum.map(keys, &{key(&1), value}) end)

          calls = if prebuilt?, do: Enum.to_list(calls), else: calls
          send(parent, {:ready, self()})

          receive do
            :go ->
              opts =
                if by_process?, do: [timeout: 60_000, partition: p - 1], else: [timeout: 60_000]

              Enum.each(calls, &(:ok = Ottla.produce(conn, topic, &1, opts)))
          end
        end)
      end)

    for %Task{pid: pid} <- tasks, do: receive(do: ({:ready, ^pid} -> :ok))
    {t0, cpu0} = {System.monotonic_time(:microsecond), cpu_seconds()}
    for %Task{pid: pid} <- tasks, do: send(pid, :go)
    Enum.each(tasks, &Task.await(&1, :infinity))
    {(System.monotonic_time(:microsecond) - t0) / 1.0e6, cpu_seconds() - cpu0}
  end

  @doc "User + system CPU seconds of this OS process so far."
  def cpu_seconds do
    stat = File.read!("/proc/self/stat")
    # Fields after the command name, which is in parentheses and may contain spaces.
    [_, rest] = String.split(stat, ") ", parts: 2)
    fields = String.split(rest)
    # utime and stime are fields 14 and 15 of the full line: 12 and 13 after the name.
    ticks = String.to_integer(Enum.at(fields, 11)) + String.to_integer(Enum.at(fields, 12))
    ticks / clock_ticks()
  end

  defp clock_ticks do
    case :persistent_term.get({__MODULE__, :clk_tck}, nil) do
      nil ->
        {out, 0} = System.cmd("getconf", ["CLK_TCK"])
        ticks = out |> String.trim() |> String.to_integer()
        :persistent_term.put({__MODULE__, :clk_tck}, ticks)
        ticks

      ticks ->
        ticks
    end
  end

  @doc "A field of /proc/self/status in bytes (VmRSS, VmHWM)."
  def proc_status_bytes(field) do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      label = field <> ":"

      case String.split(line) do
        [^label, kb, "kB"] -> String.to_integer(kb) * 1024
        _ -> nil
      end
    end)
  end

  def median(list) do
    sorted = Enum.sort(list)
    n = length(sorted)

    if rem(n, 2) == 1,
      do: Enum.at(sorted, div(n, 2)),
      else: (Enum.at(sorted, div(n, 2) - 1) + Enum.at(sorted, div(n, 2))) / 2
  end

  @doc "The `q` quantile (0..1) of a list of numbers."
  def quantile(list, q) do
    sorted = Enum.sort(list)
    Enum.at(sorted, min(length(sorted) - 1, floor(q * length(sorted))))
  end

  def rate(messages, seconds), do: messages / max(seconds, 1.0e-9)

  def fmt_rate(r) when r >= 1_000_000, do: "#{Float.round(r / 1_000_000, 2)} M"
  def fmt_rate(r) when r >= 1_000, do: "#{Float.round(r / 1_000, 1)} k"
  def fmt_rate(r), do: "#{Float.round(r * 1.0, 1)}"

  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 2)
  def fmt(x), do: to_string(x)

  def mb(bytes), do: "#{Float.round(bytes / 1_048_576, 1)} MiB"

  @doc "Prints a markdown table."
  def table(headers, rows) do
    line = fn cells -> "| " <> Enum.map_join(cells, " | ", &to_string/1) <> " |" end

    IO.puts(
      Enum.join(
        [line.(headers), line.(Enum.map(headers, fn _ -> "---" end)) | Enum.map(rows, line)],
        "\n"
      )
    )
  end

  def header(title, lines) do
    IO.puts("\n## #{title}\n")
    Enum.each(lines, &IO.puts/1)
    IO.puts("")
  end

  def machine do
    cores = :erlang.system_info(:logical_processors)

    "#{cores} cores, OTP #{System.otp_release()}, Elixir #{System.version()}, " <>
      "#{if smoke?(), do: "SMOKE sizes", else: "full sizes"}"
  end

  @doc """
  Runs `fun` while watching the VM: returns `{result, watch}` where `watch` has the scheduler
  utilisation over the run (0..1, normal schedulers) and the long_schedule events over 1 ms,
  split into those attributable to Ottla (a process running Ottla code, or a NIF of
  `Ottla.Native`) and the others.
  """
  def watch(fun) do
    me = self()
    collector = spawn_link(fn -> collect_monitor(me, []) end)
    previous = :erlang.system_monitor(collector, [{:long_schedule, 1}])
    # Ottla's hot NIFs on normal schedulers (ack, demand, latest offset) time themselves once
    # asked: their own CPU time tells a NIF's work from the OS preempting a scheduler thread,
    # which long_schedule cannot.
    _reset = Ottla.Native.nif_timing()
    sample = :scheduler.sample()
    result = fun.()
    utilisation = :scheduler.utilization(sample)
    {nif_calls, nif_max_wall_us, nif_max_cpu_us, _over_1ms} = Ottla.Native.nif_timing()
    restore_monitor(previous)
    send(collector, {:done, me})

    events =
      receive do
        {:long_schedules, events} -> events
      end

    {ours, others} = Enum.split_with(events, &ottla_event?/1)

    total =
      Enum.find_value(utilisation, 0.0, fn
        {:total, value, _} -> value
        _ -> nil
      end)

    {result,
     %{
       utilisation: total,
       long_schedules_ottla: length(ours),
       long_schedules_other: length(others),
       worst_ottla_ms: ours |> Enum.map(& &1.ms) |> Enum.max(fn -> 0 end),
       nif_calls: nif_calls,
       nif_max_cpu_us: nif_max_cpu_us,
       nif_max_wall_us: nif_max_wall_us,
       ottla_events: Enum.take(ours, 5)
     }}
  end

  defp restore_monitor(:undefined), do: :erlang.system_monitor(:undefined)
  defp restore_monitor({pid, opts}), do: :erlang.system_monitor(pid, opts)

  defp collect_monitor(parent, acc) do
    receive do
      {:monitor, who, :long_schedule, info} ->
        collect_monitor(parent, [describe(who, info) | acc])

      {:done, ^parent} ->
        send(parent, {:long_schedules, acc})
    end
  end

  defp describe(who, info) do
    initial =
      if is_pid(who) do
        case Process.info(who, [:initial_call, :dictionary]) do
          [{:initial_call, call}, {:dictionary, dict}] ->
            Keyword.get(dict, :"$initial_call", call)

          _ ->
            nil
        end
      end

    %{
      who: who,
      ms: info[:timeout],
      in: info[:in],
      out: info[:out],
      initial_call: initial
    }
  end

  defp ottla_event?(%{in: in_, out: out, initial_call: initial}) do
    Enum.any?([in_, out, initial], fn
      {module, _, _} when is_atom(module) -> ottla_module?(module)
      _ -> false
    end)
  end

  defp ottla_module?(module) do
    name = Atom.to_string(module)
    String.starts_with?(name, "Elixir.Ottla.") or name == "Elixir.Ottla"
  end

  @doc "Waits until `fun` is truthy, polling every `every` ms; raises after `timeout` ms."
  def wait_until(fun, timeout, what, every \\ 5) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait(fun, deadline, what, every)
  end

  defp do_wait(fun, deadline, what, every) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        raise "timed out waiting for #{what}"

      true ->
        Process.sleep(every)
        do_wait(fun, deadline, what, every)
    end
  end
end

defmodule Bench.CountingHandler do
  @moduledoc false
  # Counts messages (and their bytes) into :counters and acks every batch; stamps the time of
  # the first delivery.
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{counter: counter} = state) do
    if :counters.get(counter, 3) == 0,
      do: :counters.put(counter, 3, System.monotonic_time(:microsecond))

    bytes =
      Enum.reduce(messages, 0, fn m, acc -> acc + byte_size(m.value) + byte_size(m.key || "") end)

    :counters.add(counter, 2, bytes)
    :counters.add(counter, 1, length(messages))
    {:ack, state}
  end
end
