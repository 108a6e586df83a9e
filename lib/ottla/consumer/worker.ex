defmodule Ottla.Consumer.Worker do
  @moduledoc false
  # One process per assigned topic-partition. The NIF sends it a batch only after it asked
  # for one (consumer_next), so its mailbox holds at most one batch. The partition's state
  # machine (in the NIF) owns the lifecycle and the policy: attempts, backoffs, what becomes
  # of a failed last attempt (:on_failure). The worker runs the handler and reports one result
  # per batch: a plain ack goes with the request for the next batch (consumer_next, lock-free);
  # anything else (a partial ack, a failure, a seek) is one consumer_result call, whose verdict
  # may ask the worker to log a skip or to produce a dead letter.
  use GenServer, restart: :temporary
  require Logger

  alias Ottla.{Native, Telemetry}

  # Error texts in logs and dead-letter headers are cut to this many characters.
  @error_limit 500
  # How long an exactly-once batch's transaction may take.
  @transaction_timeout 30_000

  def child_spec(args) do
    %{
      id: {__MODULE__, args.topic, args.partition},
      start: {__MODULE__, :start_link, [args]},
      restart: :temporary,
      # The manager stops workers itself, within the drain timeout; this only bounds a stop
      # by the supervisor when the manager is gone.
      shutdown: 5_000
    }
  end

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl true
  def init(args) do
    # Trap exits so a shutdown lets the current batch finish (the manager bounds the wait).
    Process.flag(:trap_exit, true)
    Process.put(:ottla_topic, args.topic)
    Process.put(:ottla_partition, args.partition)
    Process.put(:ottla_generation_id, args.public_generation)
    Process.put(:ottla_connection, args.connection)

    Logger.metadata(
      topic: args.topic,
      partition: args.partition,
      generation: args.public_generation
    )

    # User code runs after init returns, so starting a worker never blocks the manager.
    {:ok, Map.put(args, :start_failures, 0), {:continue, :start}}
  end

  @impl true
  def handle_continue(:start, state), do: start(state)

  # The start of a worker, in this order: the assignment handler (once per assignment: the
  # NIF says whether this worker is the one to run it), the stored offset (offsets kept
  # elsewhere: read on every start, so a restart never redoes what the app's store holds),
  # the partition taken over (`consumer_start`: from the stored offset, which the NIF seeks
  # to and has librdkafka confirm before it delivers anything), then the handler's init/1.
  defp start(state) do
    tp = {state.topic, state.partition}

    with :ok <- announce(state, tp),
         {:ok, from} <- start_position(state),
         :ok <-
           Native.consumer_start(
             state.resource,
             state.topic,
             state.partition,
             state.generation,
             self(),
             from
           ) do
      # init/1 runs only once the partition is ours; if it fails, the worker exits and the
      # manager restarts it (the NIF keeps the messages).
      case state.handler.init(state.handler_init_args) do
        {:ok, handler_state} ->
          {:noreply, Map.put(state, :handler_state, handler_state)}

        other ->
          {:stop, {:bad_init, state.handler, other}, state}
      end
    else
      {:error, %Ottla.Error{code: :not_assigned}} ->
        # Revoked before this worker could start: the manager is about to hear of it.
        {:stop, {:shutdown, :not_assigned}, state}

      {:assignment_failed, result} ->
        send(state.manager, {:ottla_assignment_failed, tp, result})
        {:stop, {:shutdown, :assignment_received_handler}, state}

      {:offsets_failed, kind, reason, stacktrace} ->
        # A failure of this partition: try again after a backoff, like a failed batch.
        failures = state.start_failures + 1
        delay = Native.backoff_ms(state.retry_backoff, state.max_retry_backoff, failures)

        Logger.error(
          "the :offsets function failed for #{state.topic}/#{state.partition} " <>
            "(attempt #{failures}, retrying in #{delay} ms): " <>
            truncate(Exception.format(kind, reason, stacktrace))
        )

        Process.send_after(self(), :start, delay)
        {:noreply, %{state | start_failures: failures}}
    end
  end

  defp announce(%{assignment_received_handler: nil}, _tp), do: :ok

  defp announce(%{assignment_received_handler: {fun, group}} = state, tp) do
    if Native.consumer_claim_announce(
         state.resource,
         state.topic,
         state.partition,
         state.generation
       ) do
      result =
        try do
          fun.(group, state.topic, state.partition, state.public_generation)
        catch
          kind, reason -> {:error, {kind, reason, __STACKTRACE__}}
        end

      if result == :ok, do: :ok, else: {:assignment_failed, result}
    else
      # Ran already for this assignment (an earlier worker, or an earlier try of this one).
      _ = tp
      :ok
    end
  end

  # Where the partition starts: nil (Kafka's committed offset, or librdkafka's reset), or
  # with offsets kept elsewhere the app's stored offset (:begin_offset when it has none).
  defp start_position(%{offsets_fun: nil}), do: {:ok, nil}

  defp start_position(state) do
    case stored_offset(state) do
      nil -> {:ok, Ottla.Options.position(state.begin_offset)}
      offset -> {:ok, Ottla.Options.position(offset)}
    end
  catch
    kind, reason -> {:offsets_failed, kind, reason, __STACKTRACE__}
  end

  defp stored_offset(state) do
    result =
      case state.offsets_fun do
        {m, f, a} -> apply(m, f, [state.topic, state.partition | a])
        fun -> fun.(state.topic, state.partition)
      end

    case result do
      nil ->
        nil

      offset when is_integer(offset) and offset >= 0 ->
        offset

      other ->
        raise ArgumentError,
              "the :offsets function returned #{inspect(other)}; expected the next offset " <>
                "to read (a non-negative integer) or nil"
    end
  end

  @impl true
  def handle_info({:ottla_messages, _topic, _partition, _generation, attempt, messages}, state) do
    {number, _last?, high_watermark} = attempt
    Process.put(:ottla_attempt, number)
    started = System.monotonic_time()
    metadata = batch_metadata(state, messages, number, high_watermark)
    count = length(messages)

    Telemetry.execute(
      [:ottla, :consumer, :batch, :start],
      %{system_time: System.system_time(), count: count},
      metadata
    )

    {state, ack} =
      case run_handler(messages, state) do
        {:ok, result} ->
          stop(:stop, started, count, Map.put(metadata, :result, :ok))
          {result, output} = output(result, state)
          {state, ack} = apply_result(result, messages, state)
          exactly_once(state, messages, ack, output, number)

        {:failed, error, handler_state} ->
          case error do
            {:error, _reason} ->
              stop(:stop, started, count, Map.put(metadata, :result, :error))

            {kind, reason, _} ->
              stop(:exception, started, count, Map.merge(metadata, %{kind: kind, reason: reason}))
          end

          state = %{state | handler_state: handler_state}
          {failed(messages, error, number, state), nil}
      end

    # The ack of the whole batch, if any, and the request for the next batch: one call.
    outcome =
      Native.consumer_next(state.resource, state.topic, state.partition, state.generation, ack)

    if ack, do: ack_event(state, ack, outcome)
    {:noreply, state}
  end

  def handle_info(:start, state) do
    case start(state) do
      {:noreply, state} -> {:noreply, state}
      {:stop, reason, state} -> {:stop, reason, state}
    end
  end

  # Exits from the supervisor (shutdown, revocation) or from anything linked that crashed
  # stop the worker; a linked helper (a Task, say) ending normally does not.
  def handle_info({:EXIT, _from, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _from, reason}, state), do: {:stop, reason, state}

  def handle_info(other, state) do
    Logger.debug("#{inspect(state.handler)} worker ignored #{inspect(other, limit: 5)}")
    {:noreply, state}
  end

  defp batch_metadata(state, messages, attempt, high_watermark) do
    lag = high_watermark && max(high_watermark - List.last(messages).offset - 1, 0)

    %{
      connection: state.connection,
      topic: state.topic,
      partition: state.partition,
      generation_id: state.public_generation,
      attempt: attempt,
      lag: lag
    }
  end

  defp stop(kind, started, count, metadata) do
    duration = System.monotonic_time() - started

    Telemetry.execute(
      [:ottla, :consumer, :batch, kind],
      %{duration: duration, count: count},
      metadata
    )
  end

  # Runs the handler. A raise, exit or throw is a failure, after which init/1 runs again (a
  # crash leaves the handler's state unknown); {:error, reason, state} keeps the state.
  defp run_handler(messages, state) do
    case state.handler.handle_messages(messages, state.handler_state) do
      {:error, reason, handler_state} -> {:failed, {:error, reason}, handler_state}
      result -> {:ok, result}
    end
  catch
    kind, reason ->
      error = {kind, reason, __STACKTRACE__}

      case state.handler.init(state.handler_init_args) do
        {:ok, handler_state} -> {:failed, error, handler_state}
        other -> exit({:bad_init, state.handler, other})
      end
  end

  # {:produce, messages, state}: an exactly-once consumer's output, committed with the ack
  # of the batch. Returns the result to apply and the output.
  defp output({:produce, messages, handler_state}, state) do
    unless state.exactly_once,
      do:
        raise(
          ArgumentError,
          "#{inspect(state.handler)}.handle_messages/2 returned {:produce, messages, state}, " <>
            "which needs a group consumer started with exactly_once: true"
        )

    unless is_list(messages) and
             Enum.all?(messages, &match?({topic, _} when is_binary(topic), &1)),
           do:
             raise(
               ArgumentError,
               "#{inspect(state.handler)}.handle_messages/2 returned {:produce, " <>
                 "#{inspect(messages, limit: 5)}, state}; expected a list of {topic, message}"
             )

    {{:ack, handler_state}, messages}
  end

  defp output(result, %{exactly_once: true} = state) do
    case result do
      tag when tag in [:continue, :ack] ->
        output({tag, state.handler_state}, state)

      {:continue, _} ->
        raise ArgumentError,
              "#{inspect(state.handler)}.handle_messages/2 returned {:continue, state}: an " <>
                "exactly-once consumer acks a batch only with its transaction ({:ack, state} " <>
                "or {:produce, messages, state})"

      {tag, offset, _} when tag in [:ack, :acknowledge] and is_integer(offset) ->
        raise ArgumentError,
              "#{inspect(state.handler)}.handle_messages/2 returned {:ack, offset, state}: " <>
                "an exactly-once consumer acks whole batches"

      other ->
        {other, []}
    end
  end

  defp output(result, _state), do: {result, []}

  # An exactly-once consumer's ack (and output) commits in one transaction before the ack
  # counts; a transaction that fails fails the batch, which is delivered again.
  defp exactly_once(%{exactly_once: true} = state, messages, ack, output, attempt)
       when is_integer(ack) do
    batch =
      {state.resource, state.topic, state.partition, state.generation, hd(messages).offset,
       ack + 1}

    case Ottla.Transaction.commit_batch(state.connection, batch, output, @transaction_timeout) do
      :ok ->
        {state, ack}

      # A worker before this one committed the batch and died before it could say so: the
      # transaction thread acked it then.
      {:error, %Ottla.Error{code: :already_committed}} ->
        {state, nil}

      {:error, error} ->
        {failed(messages, {:error, error}, attempt, state), nil}
    end
  end

  defp exactly_once(state, _messages, ack, _output, _attempt), do: {state, ack}

  # What the handler's result means for the partition: {state, offset to ack with the
  # request for the next batch | nil}.
  defp apply_result(tag, messages, state)
       when tag in [:ack, :acknowledge, :no_ack, :noop, :continue],
       do: apply_result({tag, state.handler_state}, messages, state)

  defp apply_result(result, messages, state) do
    case result do
      {tag, handler_state} when tag in [:ack, :acknowledge] ->
        {%{state | handler_state: handler_state}, List.last(messages).offset}

      {tag, offset, handler_state} when tag in [:ack, :acknowledge] and is_integer(offset) ->
        {%{state | handler_state: handler_state}, partial_ack(state, messages, offset)}

      {tag, handler_state} when tag in [:no_ack, :noop, :continue] ->
        {%{state | handler_state: handler_state}, nil}

      # Offsets are 64-bit: a bigger one falls to the clause naming what is expected.
      {:seek, offset, handler_state}
      when is_integer(offset) and offset >= 0 and offset <= 9_223_372_036_854_775_807 ->
        result(state, {:seek, {:offset, offset}})
        {%{state | handler_state: handler_state}, nil}

      other ->
        raise ArgumentError,
              "#{inspect(state.handler)}.handle_messages/2 returned #{inspect(other, limit: 5)}; " <>
                "expected {:ack, state}, {:ack, offset, state}, {:no_ack, state}, {:noop, state}, " <>
                "{:continue, state}, {:seek, offset, state} or {:error, reason, state}"
    end
  end

  # Acks up to `offset` (within the batch) and has the rest of the batch delivered again;
  # returns the offset to ack with the next request when it is the whole batch.
  defp partial_ack(state, messages, offset) do
    first = hd(messages).offset
    last = List.last(messages).offset

    cond do
      offset >= last ->
        last

      offset >= first ->
        ack(state, offset)
        result(state, {:partial_ack, offset})
        nil

      true ->
        # Redelivering from below the batch would hand the same batch back forever.
        Logger.warning(
          "#{inspect(state.handler)} returned {:ack, #{offset}, state} for a batch of offsets " <>
            "#{first}..#{last}: below the batch, so nothing is acked and nothing redelivered"
        )

        nil
    end
  end

  # A failed batch: logged once per attempt (offsets and error, never payloads), and reported.
  # The partition decides what follows: a retry after a backoff, or for a last attempt what
  # :on_failure says (a skip to log, a dead letter to produce).
  defp failed(messages, error, attempt, state) do
    first = hd(messages).offset
    last = List.last(messages).offset
    text = error_text(error)

    Logger.warning(
      "#{inspect(state.handler)} failed offsets #{first}..#{last} of " <>
        "#{state.topic}/#{state.partition} (attempt #{attempt}): #{text}"
    )

    case result(state, {:failed, first}) do
      :ok ->
        state

      {:skipped, offset} ->
        Logger.error(
          "skipping offset #{offset} of #{state.topic}/#{state.partition} after #{attempt} " <>
            "attempts: #{text}"
        )

        state

      {:dead_letter, offset} ->
        {:dead_letter, topic} = state.on_failure
        message = Enum.find(messages, &(&1.offset == offset))

        ok? =
          case dead_letter(state, topic, message, text, attempt) do
            :ok ->
              Logger.error(
                "dead-lettered offset #{offset} of #{state.topic}/#{state.partition} to " <>
                  "#{topic} after #{attempt} attempts: #{text}"
              )

              true

            {:error, dlq_error, _} ->
              # Never ack a message that went nowhere: the partition tries it again.
              Logger.error(
                "could not dead-letter offset #{offset} of #{state.topic}/#{state.partition} " <>
                  "to #{topic} (retrying): #{Exception.message(dlq_error)}"
              )

              false
          end

        result(state, {:dead_lettered, offset, ok?})
        state
    end
  end

  defp result(state, result),
    do:
      Native.consumer_result(
        state.resource,
        state.topic,
        state.partition,
        state.generation,
        result
      )

  defp dead_letter(state, topic, message, text, attempts) do
    headers =
      message.headers ++
        [
          {"ottla.error", text},
          {"ottla.source.topic", message.topic},
          {"ottla.source.partition", Integer.to_string(message.partition)},
          {"ottla.source.offset", Integer.to_string(message.offset)},
          {"ottla.attempts", Integer.to_string(attempts)},
          {"ottla.failed_at", DateTime.to_iso8601(DateTime.utc_now())}
        ]

    record = %{key: message.key, value: message.value, headers: headers}
    Ottla.Producer.produce_for_connection(state.connection, topic, record, timeout: 30_000)
  end

  defp error_text({:error, reason}), do: truncate("{:error, #{inspect(reason, limit: 20)}}")

  defp error_text({kind, reason, stacktrace}),
    do: truncate(Exception.format(kind, reason, stacktrace))

  defp truncate(text) do
    if String.length(text) > @error_limit,
      do: String.slice(text, 0, @error_limit) <> "…",
      else: text
  end

  defp ack(state, offset) do
    outcome =
      Native.consumer_ack(state.resource, state.topic, state.partition, state.generation, offset)

    ack_event(state, offset, outcome)
  end

  defp ack_event(state, offset, result) do
    Telemetry.execute([:ottla, :consumer, :ack], %{offset: offset}, %{
      connection: state.connection,
      topic: state.topic,
      partition: state.partition,
      generation_id: state.public_generation,
      result: result
    })
  end
end
