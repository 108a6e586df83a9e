defmodule Ottla.Producer do
  @moduledoc """
  Producing, with the API of Elsa's `Elsa.Producer`: `produce/4` (the same as
  `Ottla.produce/4`) and `ready?/1`.

  A call validates and encodes its messages, picks partitions, hands the whole list to the
  NIF at once and waits for one verdict message.

  ## Example

      :ok = Ottla.Producer.produce(:conn, "events", [{"k", "v"}])
      true = Ottla.Producer.ready?(:conn)
  """

  alias Ottla.{Connection, Native, Options}

  @opts [:partition, :connection, partitioner: :default, timeout: 30_000, config: []]
  @inline_messages 2_000
  # librdkafka's timestamps are 64-bit milliseconds.
  @max_timestamp 9_223_372_036_854_775_807

  @doc """
  Produces through a connection's producer (dead letters). A connection started without one
  gets one, with Ottla's producer defaults, the first time it is needed; only when that
  producer cannot start does a short-lived one with the connection's settings send.
  """
  def produce_for_connection(name, topic, messages, opts) do
    case Connection.lookup(name) do
      %Connection{producer: nil} = conn ->
        case Connection.start_producer(conn, []) do
          :ok -> produce(name, topic, messages, opts)
          {:error, _} -> produce({:connection_settings, conn}, topic, messages, opts)
        end

      _ ->
        produce(name, topic, messages, opts)
    end
  end

  @doc "See `Ottla.produce/4`."
  @spec produce(Ottla.target(), String.t(), Ottla.message() | [Ottla.message()], keyword) ::
          :ok | {:error, Ottla.Error.t(), [{Ottla.message(), Ottla.Error.t()}]}
  def produce(target, topic, messages, opts \\ [])

  def produce(target, topic, messages, opts) do
    opts = Options.keyword!(opts, @opts, "Ottla.produce/4 options")
    topic = Options.topic!(topic)
    timeout = Options.timeout!(opts[:timeout], :timeout)
    partition = opts[:partition] && Options.integer!(opts[:partition], :partition, 0)
    partitioner = partitioner!(opts[:partitioner])
    extra_config = Options.kafka_config!(opts[:config])

    if List.keymember?(extra_config, "transactional.id", 0),
      do:
        raise(
          ArgumentError,
          "invalid :config: a transactional.id belongs to a connection's producer " <>
            "(Ottla.Supervisor's producer: [transactional_id: ...]), not to one call"
        )

    originals = if is_list(messages), do: messages, else: [messages]

    unless Options.proper_list?(originals),
      do:
        raise(ArgumentError, "invalid messages #{inspect(messages, limit: 5)}: not a proper list")

    # Binaries and {key, value} pairs of binaries go to the NIF as they are (it reads them in
    # place, and gives them the call's :partition); other shapes (iodata, maps) and calls with
    # an Elixir-side partitioner are encoded here.
    encoded =
      if (partition != nil or partitioner == :default) and all_plain?(originals),
        do: originals,
        else: Enum.map(originals, &encode!/1)

    resolved =
      case target do
        {:connection_settings, conn} -> {:ok, {conn.bootstrap, conn.config, nil}}
        target -> resolve(target, opts[:connection])
      end

    cond do
      originals == [] ->
        :ok

      match?({:error, _}, resolved) ->
        {:error, error} = resolved
        whole_call_failed(error, originals)

      true ->
        {:ok, {bootstrap, config, conn}} = resolved
        settings = {partition, partitioner, timeout, extra_config}
        call = {{bootstrap, config, conn}, {topic, encoded, originals}, settings}

        # Without :telemetry, no span and no pass over the messages to count bytes.
        if Ottla.Telemetry.enabled?(),
          do: produce_span(call, if(conn, do: conn.name, else: bootstrap)),
          else: produce_resolved(call)
    end
  end

  defp produce_span({_, {topic, encoded, _}, _} = call, target) do
    metadata = %{topic: topic, target: target}

    Ottla.Telemetry.span([:ottla, :produce], %{count: length(encoded)}, metadata, fn ->
      result = produce_resolved(call)

      {failed, outcome} =
        case result do
          :ok -> {0, :ok}
          {:error, _, failed} -> {length(failed), :error}
        end

      {result, %{count: length(encoded), bytes: payload_bytes(encoded), failed: failed},
       %{result: outcome}}
    end)
  end

  defp payload_bytes(encoded) do
    Enum.reduce(encoded, 0, fn
      value, sum when is_binary(value) -> sum + byte_size(value)
      {key, value}, sum -> sum + size_of(key) + size_of(value)
      {key, value, _, _, _}, sum -> sum + size_of(key) + size_of(value)
    end)
  end

  defp size_of(nil), do: 0
  defp size_of(binary), do: byte_size(binary)

  # A list of binaries and {binary | nil, binary | nil} pairs: what the NIF reads as is.
  defp all_plain?([]), do: true
  defp all_plain?([value | rest]) when is_binary(value), do: all_plain?(rest)

  defp all_plain?([{key, value} | rest])
       when (is_binary(key) or is_nil(key)) and (is_binary(value) or is_nil(value)),
       do: all_plain?(rest)

  defp all_plain?(_), do: false

  @doc """
  Whether `connection` runs and has a producer, as Elsa's `ready?/1`. Ottla's producer is
  ready as soon as the connection has started (librdkafka connects on first use).
  """
  @spec ready?(atom) :: boolean
  def ready?(connection) do
    match?(%Connection{producer: producer} when producer != nil, Connection.lookup(connection))
  end

  # A connection name that does not run is an error value (Elsa users match on it); endpoints
  # with a `:connection` option that runs use that connection, as Elsa did.
  defp resolve(name, _connection) when is_atom(name) and name not in [nil, true, false] do
    case Connection.lookup(name) do
      nil ->
        {:error,
         Ottla.Error.new(:no_connection, "no Ottla connection named #{inspect(name)} is running")}

      conn ->
        {:ok, {conn.bootstrap, conn.config, conn}}
    end
  end

  defp resolve(endpoints, connection) do
    bootstrap = Options.bootstrap!(endpoints)

    case connection && Connection.lookup(Options.connection!(connection, ":connection")) do
      %Connection{producer: producer} = conn when producer != nil ->
        {:ok, {conn.bootstrap, conn.config, conn}}

      _ ->
        {:ok, {bootstrap, [], nil}}
    end
  end

  defp produce_resolved({{bootstrap, config, conn}, {topic, encoded, originals}, settings}) do
    {partition, partitioner, timeout, extra_config} = settings

    cond do
      conn != nil and conn.producer == nil ->
        error =
          Ottla.Error.new(
            :no_producer,
            "connection #{inspect(conn.name)} was started without a :producer option"
          )

        whole_call_failed(error, originals)

      conn != nil and conn.transactional? ->
        send =
          &send_batch(
            conn.producer,
            topic,
            encoded,
            originals,
            partition,
            partitioner,
            timeout,
            &1
          )

        # Inside Ottla.transaction/3 the messages join the caller's transaction; outside
        # it, the call is a transaction of its own.
        case Ottla.Transaction.current(conn) do
          nil ->
            case Ottla.Transaction.produce_alone(conn, timeout, send) do
              :ok -> :ok
              {:error, error} -> whole_call_failed(error, originals)
            end

          :stale ->
            error = Ottla.Transaction.stale_error(conn)
            Ottla.Transaction.failed(conn, error)
            whole_call_failed(error, originals)

          txn ->
            case send.(txn) do
              :ok ->
                :ok

              {:error, error, _failed} = failure ->
                Ottla.Transaction.failed(conn, error)
                failure
            end
        end

      conn != nil ->
        send_batch(conn.producer, topic, encoded, originals, partition, partitioner, timeout, 0)

      true ->
        # librdkafka gives every message its verdict within message.timeout.ms: a little
        # less than the call's timeout, so the verdicts are in when the call returns.
        message_timeout = max(timeout - min(div(timeout, 10), 500), 1)

        props =
          Connection.producer_defaults() ++
            config ++
            extra_config ++ [{"message.timeout.ms", Integer.to_string(message_timeout)}]

        case Native.producer_new(bootstrap, props) do
          {:ok, producer} ->
            try do
              send_batch(producer, topic, encoded, originals, partition, partitioner, timeout, 0)
            after
              Native.producer_close(producer, 1_000)
            end

          {:error, error} ->
            whole_call_failed(error, originals)
        end
    end
  end

  # `txn`: the id of the caller's open transaction on a transactional producer, 0 otherwise.
  defp send_batch(producer, topic, encoded, originals, partition, partitioner, timeout, txn) do
    started = System.monotonic_time(:millisecond)

    case assign_partitions(producer, topic, encoded, partition, partitioner, timeout) do
      {:ok, tuples} ->
        left = max(timeout - (System.monotonic_time(:millisecond) - started), 0)
        tag = System.unique_integer([:positive])

        # Messages without a partition of their own (-1) go to the call's :partition.
        call_partition = partition || -1

        case native_send(producer, tag, topic, tuples, {call_partition, txn}, left) do
          {:pending, batch} ->
            await(batch, tag, originals, left)

          :needs_encoding ->
            # Not reached with the shapes all_plain?/1 lets through; a safe path all the same.
            encoded = Enum.map(originals, &encode!/1)

            {:pending, batch} =
              native_send(producer, tag, topic, encoded, {call_partition, txn}, left)

            await(batch, tag, originals, left)
        end

      {:error, error} ->
        whole_call_failed(error, originals)
    end
  end

  # A call of up to @inline_messages messages and 1 MiB is copied on this scheduler and handed
  # to the producer's thread; a larger one enqueues on a dirty CPU scheduler.
  defp native_send(producer, tag, topic, messages, {partition, txn}, timeout) do
    if length(messages) <= @inline_messages do
      case Native.producer_send(producer, self(), tag, topic, messages, partition, txn, timeout) do
        :large ->
          Native.producer_send_dirty(
            producer,
            self(),
            tag,
            topic,
            messages,
            partition,
            txn,
            timeout
          )

        other ->
          other
      end
    else
      Native.producer_send_dirty(producer, self(), tag, topic, messages, partition, txn, timeout)
    end
  end

  defp await(batch, tag, originals, timeout) do
    receive do
      {:ottla_produced, ^tag, failures} -> verdict(failures, originals)
    after
      timeout ->
        case Native.producer_abandon(batch) do
          :sent ->
            # Every verdict came in as the timeout passed: the message is on its way.
            receive do
              {:ottla_produced, ^tag, failures} -> verdict(failures, originals)
            end

          {:abandoned, failures, unreported} ->
            still_queued =
              Ottla.Error.new(
                :timed_out,
                "no delivery report within #{timeout} ms: the message is still queued and " <>
                  "may yet be delivered",
                true
              )

            still_queued = %{still_queued | possibly_persisted?: true}
            late = Enum.map(unreported, &{&1, still_queued})
            verdict(Enum.sort(failures ++ late), originals)
        end
    end
  end

  # The call could not be made at all: every message failed with the same error.
  defp whole_call_failed(error, originals),
    do: {:error, error, Enum.map(originals, &{&1, error})}

  defp verdict([], _originals), do: :ok

  defp verdict(failures, originals) do
    by_index = List.to_tuple(originals)
    failed = Enum.map(failures, fn {index, error} -> {elem(by_index, index), error} end)
    [{_, first} | _] = failed

    summary =
      Ottla.Error.new(
        first.code,
        "#{length(failed)} of #{tuple_size(by_index)} messages were not delivered; first: #{first.message}",
        Enum.all?(failed, fn {_, e} -> e.retriable? end)
      )

    {:error,
     %{summary | possibly_persisted?: Enum.any?(failed, fn {_, e} -> e.possibly_persisted? end)},
     failed}
  end

  # The NIF gives the call's partition to every message.
  defp assign_partitions(_producer, _topic, encoded, partition, _partitioner, _timeout)
       when is_integer(partition),
       do: {:ok, encoded}

  defp assign_partitions(_producer, _topic, encoded, nil, :default, _timeout), do: {:ok, encoded}

  defp assign_partitions(producer, topic, encoded, nil, partitioner, timeout) do
    with {:ok, count} <-
           Ottla.Reply.await(
             &Native.producer_partition_count(&1, &2, producer, topic, timeout),
             timeout
           ) do
      {:ok, Enum.map(encoded, &put_elem(&1, 4, pick(partitioner, count, elem(&1, 0))))}
    end
  end

  defp pick(:random, count, key), do: Ottla.Partitioner.Random.partition(count, key)
  # Elsa's md5 partitioner, so keys keep their partitions when moving from Elsa.
  defp pick(:md5, count, key), do: Ottla.Partitioner.Md5.partition(count, key)

  defp pick(partitioner, count, key) do
    result =
      try do
        if is_atom(partitioner),
          do: partitioner.partition(count, key),
          else: partitioner.(count, key)
      rescue
        # Not a partitioner after all (a module with an unrelated partition/2, a function
        # that fails on these arguments): the argument is wrong.
        e ->
          raise ArgumentError,
                "the :partitioner #{inspect(partitioner)} raised for key #{inspect(key)}: " <>
                  Exception.message(e)
      end

    case result do
      p when is_integer(p) and p >= 0 and p < count ->
        p

      other ->
        raise ArgumentError,
              "the :partitioner #{inspect(partitioner)} returned #{inspect(other)} for key #{inspect(key)}; " <>
                "expected an integer from 0 to #{count - 1}"
    end
  end

  defp partitioner!(p) when p in [:default, :random, :md5], do: p
  # librdkafka places keys exactly as Ottla.Partitioner.Default would.
  defp partitioner!(Ottla.Partitioner.Default), do: :default
  defp partitioner!(fun) when is_function(fun, 2), do: fun

  defp partitioner!(module) when is_atom(module) and module not in [nil, true, false] do
    if Code.ensure_loaded?(module) and function_exported?(module, :partition, 2),
      do: module,
      else: partitioner!({:not_a_partitioner, module})
  end

  defp partitioner!(other) do
    raise ArgumentError,
          "invalid :partitioner #{inspect(other)}: expected :default, :random, :md5, a module " <>
            "implementing Ottla.Partitioner, or a function (partition_count, key) -> partition"
  end

  # {key, value, headers, timestamp, partition}; partition -1 lets librdkafka choose. Keys and
  # values may be iodata (as in Elsa), turned into one binary each.
  defp encode!(value) when is_binary(value), do: {nil, value, [], nil, -1}
  defp encode!(iolist) when is_list(iolist), do: {nil, bytes!(iolist, iolist), [], nil, -1}

  defp encode!({key, value} = message),
    do: {bytes!(key, message), bytes!(value, message), [], nil, -1}

  defp encode!(%{value: value} = message) do
    key = bytes!(Map.get(message, :key), message)
    value = bytes!(value, message)
    timestamp = Map.get(message, :timestamp)

    unless is_nil(timestamp) or (is_integer(timestamp) and timestamp in 0..@max_timestamp),
      do:
        bad_message!(message, "its :timestamp is not an integer from 0 to #{@max_timestamp} (ms)")

    {key, value, headers!(Map.get(message, :headers) || [], message), timestamp, -1}
  end

  defp encode!(other),
    do:
      bad_message!(
        other,
        "expected a binary, iodata in a list, {key, value} or %{key: k, value: v, headers: [...]}"
      )

  defp bytes!(nil, _message), do: nil
  defp bytes!(binary, _message) when is_binary(binary), do: binary

  defp bytes!(iodata, message) when is_list(iodata) do
    IO.iodata_to_binary(iodata)
  rescue
    ArgumentError -> bad_message!(message, "a key or value is neither a binary nor iodata")
  end

  defp bytes!(_other, message),
    do: bad_message!(message, "a key or value is neither a binary nor iodata")

  defp headers!(headers, message) when is_list(headers) do
    unless Options.proper_list?(headers),
      do: bad_message!(message, "its :headers must be a proper list")

    Enum.map(headers, fn
      # Kafka's header names are strings; values are any bytes.
      {name, value}
      when (is_binary(name) or is_atom(name)) and
             (is_binary(value) or is_nil(value)) ->
        name = to_string(name)

        # Read back as a C string: a NUL byte would cut it.
        unless Options.text?(name),
          do: bad_message!(message, "a header name is not UTF-8 without NUL: #{inspect(name)}")

        {name, value}

      _ ->
        bad_message!(message, "its :headers must be a list of {name, binary} pairs")
    end)
  end

  defp headers!(_headers, message), do: bad_message!(message, "its :headers must be a list")

  defp bad_message!(message, why),
    do: raise(ArgumentError, "invalid message in messages #{inspect(message, limit: 5)}: #{why}")
end
